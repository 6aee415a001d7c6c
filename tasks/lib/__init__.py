"""Code the stages share. Nothing here is a stage: each stage is one module of `tasks/`.

- `schema`: the typed params.yaml schema; `params`: loading and validating it; `params_cli`: validating a file from
  the command line and printing the params reference (docs/params.md).
- `stage`: every stage's command-line tail (params, `--round`, exit status 2 on bad input); `errors`: bad-input kinds.
- `files`: atomic outputs, JSON and JSON-lines files; `hashing`: content digests of files and folders.
- `records`: validating data files (file:line reasons); `formats`: ShareGPT/HH/Alpaca rows to TRL's; `chat`:
  rendering prompts and responses as the model sees them.
- `policies`: loading, saving, merging and scrubbing model folders; `training`: settings shared by the trainers.
- `generation`: sampling backends (`vllm_worker`: vLLM's side, run in vLLM's own environment); `judges`: the
  judge kinds; `builtin_task`: the built-in task's rule verifier.
- `distributed`: ranks and process groups; `stats`: win rates and length control; `timing`: where a stage's time
  goes; `vega`: offline charts; `warm`: stage processes forked from a server with the libraries imported.
"""
