"""Code the stages share. Nothing here is a stage: each stage is one module of `tasks/`.

- `schema`: the typed params.yaml schema; `params`: loading and validating it; `params_docs`: README's reference.
- `stage`: every stage's command-line tail (params, `--round`, exit status 2 on bad input).
- `files`: atomic outputs, JSON and JSON-lines files; `hashing`: content digests of files and folders.
- `records`: validating data files (file:line reasons); `chat`: rendering prompts and responses as the model sees them.
- `policies`: loading, saving, merging and scrubbing model folders; `training`: settings shared by the trainers.
- `generation`: sampling backends; `builtin_task`: the built-in task's rule verifier.
"""
