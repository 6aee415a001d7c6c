"""The typed schema of params.yaml: every setting of every stage, with its documentation.

Each field's docstring is its documentation: `tasks.lib.params_cli` renders the params
reference in docs/params.md from it (a test keeps the two in sync); `tasks.lib.params` loads and validates a file
against it.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

LossType = Literal[
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
]  # fmt: skip
BUILTIN = "builtin"
SFT_POLICY = "sft"
PROJECT_EVAL_TASKS = (
    "sftdpo_preference", "sftdpo_generation", "sftdpo_perplexity", "sftdpo_chosen_nll", "sftdpo_text_nll",
)  # fmt: skip
"""The project's own lm-eval tasks (tasks/lm_eval_tasks/), rendered per model from the held-out data."""
GATE_THRESHOLD_TASKS = {
    "max_task_accuracy_drop": "sftdpo_generation",
    "max_perplexity_rise": "sftdpo_perplexity",
    "max_chosen_nll_rise": "sftdpo_chosen_nll",
    "max_chosen_nll_rise_vs_sft": "sftdpo_chosen_nll",
}
"""Each `dpo.gate` threshold and the project eval task whose metric it reads."""
RESERVED_ROUND_NAMES = (SFT_POLICY, "merged", "base")

PositiveInt = Annotated[int, Field(ge=1)]
Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]


class Section(BaseModel):
    """A params.yaml section: unknown keys are errors and every field carries its docstring."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)


CHAT_TEMPLATES_DIR = "chat_templates"
"""Where `model.chat_template` files live: dvc.yaml's `base` stage depends on this folder."""


class HubDatasetParams(Section):
    id: str
    """Hub dataset id, e.g. `trl-lib/ultrafeedback_binarized`."""
    split: str = "train"
    """Split to load."""
    subset: str | None = None
    """Configuration (subset) name, `load_dataset`'s `name`; None: the dataset's default."""
    revision: str | None = None
    """Revision to load; pin a 40-hex commit sha (the fetched copy is checked against it and recorded in lineage).
    None: the default branch as the hub or the local cache has it."""


class DataParams(Section):
    sft: str
    """SFT data: `{"prompt","completion"}` strings or `{"messages": [...]}` conversations (or ShareGPT / Alpaca
    rows, see `format`), in a JSON-lines, JSON-list or parquet file or a `save_to_disk` folder. Required: dvc.yaml
    names it as a dependency (the built-in task's is `data/builtin/sft.jsonl`)."""
    eval_pairs: str
    """Held-out preference pairs `{"prompt","chosen","rejected"}` (strings or message lists; or ShareGPT, HH,
    Alpaca rows) used only for evaluation, from the same kinds of source as `sft`. Required: dvc.yaml names it
    (the built-in task's is `data/builtin/eval_pairs.jsonl`)."""
    format: Literal["auto", "trl", "sharegpt", "hh", "alpaca"] = "auto"
    """Row format of every data source: `auto` detects each row's from its fields; a value forces one (TRL's own,
    ShareGPT/LLaMA-Factory `conversations`, Anthropic HH dialogues, Alpaca `instruction`/`input`/`output`)."""
    extra_fields: Literal["ignore", "refuse"] = "ignore"
    """Fields of a data row beyond its kind's own (a dataset's ids, `source`, `metadata`, `score_chosen`, a
    `messages` copy beside a pair): `ignore` sets them aside (never trained on, counted per field in the data
    report as `extra_fields_set_aside`); `refuse` makes such a row a bad line (see `on_bad_lines`)."""
    sample_fraction: float = Field(1.0, gt=0.0, le=1.0)
    """Fraction of the SFT rows and of the held-out pairs kept (a seeded sample, after validation and dedup)."""
    max_rows: PositiveInt | None = None
    """At most this many SFT rows and held-out pairs kept (after `sample_fraction`; None: no limit)."""
    heldout_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    """Fraction of SFT rows held out (SFT eval loss and held-out perplexity)."""
    on_bad_lines: Literal["fail", "drop"] = "fail"
    """What a malformed data line does: `fail` stops the run listing every bad line; `drop` removes them."""
    max_bad_fraction: Fraction = 0.05
    """With `on_bad_lines: drop`, the largest fraction of a file's lines that may be dropped before the run fails."""
    seed: int = 0
    """Seed of the SFT train/held-out split and of the row sampling."""
    hub: dict[str, HubDatasetParams] = {}
    """Hub datasets to fetch. Each `name: {id, split, subset, revision}` is a `fetch@name` stage that loads it with
    `datasets.load_dataset` (offline: from the local Hugging Face cache) and saves it to `data/hub/<name>`, a
    `save_to_disk` folder any data key (`sft`, `eval_pairs`, `onpolicy.prompts.pool`, an incoming file) can name.
    DVC then versions the fetched rows, so a run is reproducible even after the hub copy changes."""


class BuiltinModelParams(Section):
    vocab_size: int = Field(512, ge=300)
    """Byte-level BPE vocabulary size of the built-in tokenizer (256 byte tokens + merges + specials)."""
    hidden_size: PositiveInt = 128
    """Hidden width of the built-in Llama model."""
    num_layers: PositiveInt = 2
    """Transformer layers of the built-in model."""
    num_heads: PositiveInt = 4
    """Attention heads of the built-in model."""
    num_kv_heads: PositiveInt = 2
    """Key/value heads (grouped-query attention) of the built-in model; must divide `num_heads`."""
    intermediate_size: PositiveInt = 512
    """MLP width of the built-in model."""
    max_position_embeddings: PositiveInt = 256
    """Longest sequence the built-in model accepts."""
    seed: int = 0
    """Seed of the built-in model's random initialisation."""

    @model_validator(mode="after")
    def _heads_divide(self) -> BuiltinModelParams:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("hidden_size must be divisible by num_heads, and num_heads by num_kv_heads")
        return self


class ModelParams(Section):
    base: str = BUILTIN
    """`builtin` (a small Llama and tokenizer built locally, no download), a hub id such as `Qwen/Qwen3-4B`, or a
    local model folder."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of `base`; ignored for `builtin` and local folders."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype when loading `base` and every policy (`auto`: as saved in the checkpoint)."""
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2", "flash_attention_3"] | None = None
    """Attention kernel passed to `from_pretrained` (None: transformers' default)."""
    quantization: Literal["none", "4bit", "8bit"] = "none"
    """Load trained policies through bitsandbytes in 4-bit (QLoRA) or 8-bit; needs `method: lora`."""
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type for `quantization: 4bit`."""
    trust_remote_code: bool = False
    """Allow model code shipped with a hub model to run. Off unless you trust the repository."""
    enable_thinking: bool | None = None
    """For hybrid-thinking templates (Qwen3): `false` renders the empty `<think>` block into every generation
    prompt (the model answers without reasoning and never learns to emit one), `true` leaves thinking to the model;
    null keeps the template's default. Set into the template itself, so SFT, DPO, sampling and lm-eval all see it."""
    chat_template: str | None = None
    """A Jinja chat template file that replaces the tokenizer's own, for every stage (e.g. to add `{% generation %}`
    markers so SFT learns every assistant turn, or for a base model without a template). It must live in
    `chat_templates/`, the folder the `base` stage depends on, so editing it re-runs what it changes. None: the
    tokenizer's own template."""
    builtin: BuiltinModelParams = BuiltinModelParams()
    """Shape of the built-in model (used when `base: builtin`)."""

    @field_validator("chat_template")
    @classmethod
    def _template_in_tracked_folder(cls, value: str | None) -> str | None:
        # A field check: its error is reported at the key's own line of params.yaml, not at `model:`.
        if value is not None:
            path = PurePosixPath(value)
            if path.is_absolute() or path.parts[:1] != (CHAT_TEMPLATES_DIR,) or ".." in path.parts:
                raise ValueError(
                    f"put the template in {CHAT_TEMPLATES_DIR}/ (a path relative to the project) so DVC tracks its "
                    "content"
                )
        return value


class LoraParams(Section):
    r: PositiveInt = 8
    """LoRA rank."""
    alpha: float = Field(16.0, gt=0)
    """LoRA scaling numerator (`alpha / r` scales the update)."""
    dropout: Fraction = 0.0
    """Dropout on the LoRA input."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module names to adapt (e.g. `[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]`) or
    `all-linear`."""


class TrainingParams(Section):
    learning_rate: float = Field(gt=0)
    """Peak learning rate."""
    epochs: float = Field(1.0, gt=0)
    """Passes over the training data (ignored when `max_steps` > 0)."""
    max_steps: int = Field(-1, ge=-1)
    """Optimizer steps to run; -1 trains for `epochs`."""
    batch_size: PositiveInt = 8
    """Examples per device per forward pass."""
    gradient_accumulation: PositiveInt = 1
    """Forward passes accumulated per optimizer step (effective batch = batch_size x this x devices)."""
    warmup_ratio: Fraction = 0.1
    """Fraction of the steps spent warming the learning rate up."""
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    """Learning-rate schedule after warm-up."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30% slower."""
    bf16: bool | Literal["auto"] = "auto"
    """Train in bfloat16 mixed precision; `auto` uses it where the GPU supports it and never on CPU."""
    save_steps: PositiveInt = 500
    """Save a resumable checkpoint every N optimizer steps."""
    save_total_limit: PositiveInt = 2
    """Keep at most this many checkpoints."""
    logging_steps: PositiveInt = 5
    """Log metrics (plots file and TensorBoard) every N steps."""
    seed: int = 0
    """Seed of data order, dropout and adapter initialisation."""


class SFTParams(Section):
    method: Literal["full", "lora"] = "full"
    """`full` fine-tunes every weight; `lora` trains an adapter (merged into the reference snapshot)."""
    lora: LoraParams = LoraParams()
    """Adapter settings when `method: lora`."""
    max_length: PositiveInt = 128
    """Tokens per example; longer examples are truncated."""
    train: TrainingParams = TrainingParams(learning_rate=3e-3, epochs=12, batch_size=16)
    """Optimisation settings of SFT. Loss is on completion/assistant tokens only."""


class ReferenceParams(Section):
    batch_size: PositiveInt = 16
    """Pairs per forward pass when computing the reference log-probabilities of each round's pairs."""


class LossParams(Section):
    types: list[LossType] = Field(default_factory=lambda: ["sigmoid"], min_length=1)
    """DPO loss terms (TRL `loss_type`); e.g. `[sigmoid]`, `[ipo]`, `[sigmoid, sft]` (DPO + an SFT term against
    forgetting)."""
    weights: list[float] | None = None
    """Weight of each loss term, same length as `types` (None: all 1.0)."""
    beta: float = Field(0.1, gt=0)
    """Strength of the KL anchor to the reference: higher keeps the policy closer to it."""
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    """Assumed fraction of flipped preference labels (cDPO / robust DPO)."""
    ld_alpha: float | None = Field(None, ge=0.0, le=1.0)
    """LD-DPO (arXiv 2409.06411, TRL's `ld_alpha`): weight of the response tokens past the shorter response's length
    in the log-probs (1.0 = plain DPO, 0.0 = only the shared length counts), against length exploitation; None: off."""

    @model_validator(mode="after")
    def _one_weight_per_type(self) -> LossParams:
        if self.weights is not None and len(self.weights) != len(self.types):
            raise ValueError(f"weights has {len(self.weights)} entries but types has {len(self.types)}")
        return self


class ReferenceFreeParams(Section):
    orpo_lambda: float = Field(0.1, gt=0)
    """ORPO: weight of the odds-ratio preference term added to the SFT (NLL) loss on chosen responses (TRL's
    `ORPOConfig.beta`, the paper's lambda)."""
    simpo_beta: float = Field(2.0, gt=0)
    """SimPO: scale of the length-normalised log-prob reward (TRL's `CPOConfig.beta` with `loss_type: simpo`)."""
    simpo_gamma: float = Field(0.5, ge=0)
    """SimPO: target reward margin between chosen and rejected (TRL's `simpo_gamma`)."""
    simpo_sft_weight: float = Field(0.0, ge=0)
    """SimPO: weight of an SFT (NLL) term on chosen responses (TRL's `cpo_alpha`; 0 is plain SimPO, >0 CPO-SimPO)."""


class SequenceParams(Section):
    max_length: PositiveInt = 128
    """Tokens of prompt + response per pair; longer pairs are truncated (the data report counts them)."""
    truncation_mode: Literal["keep_start", "keep_end"] = "keep_start"
    """Which end of an over-long training pair to keep: `keep_start` (the prompt whole, the response's end cut; what
    `prepare` does to the held-out pairs every evaluator reads) or `keep_end` (the prompt's start cut; TRL deprecates
    it and drops it in TRL 2.0)."""


class EarlyStoppingParams(Section):
    patience: PositiveInt | None = None
    """Stop a DPO round (`objective: dpo`) once its validation `metric` has not improved for this many evaluations,
    and keep the best checkpoint (transformers' `EarlyStoppingCallback` with `load_best_model_at_end`); None: train
    every step."""
    validation_fraction: float = Field(0.1, gt=0, lt=1)
    """Share of each round's own pairs (a seeded sample) set aside, not trained on, as the set the round is stopped
    on. Never the held-out eval pairs: stopping on them would select each round on the set its evaluation reports."""
    eval_steps: PositiveInt = 5
    """Evaluate (and checkpoint) the round every this many optimizer steps while early stopping is on."""
    metric: Literal["eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"] = "eval_loss"
    """Validation metric the round is stopped on: the DPO loss (lower is better) or TRL's reward accuracy / margin
    (higher is better)."""


class GuardParams(Section):
    max_chosen_logp_drop: float = Field(10.0, gt=0)
    """Collapse guard: largest allowed fall (nats per sequence) of held-out chosen log-prob versus the reference."""
    sanity_prompts: PositiveInt = 8
    """Held-out prompts answered greedily after the round for the generation sanity check."""
    sanity_max_new_tokens: PositiveInt = 48
    """Token budget of each sanity generation."""
    min_distinct_trigrams: float = Field(0.5, ge=0, le=1)
    """A sanity generation passes when non-empty and at least this fraction of its token trigrams are distinct."""
    min_sanity_pass_rate: float = Field(0.75, ge=0, le=1)
    """Smallest fraction of sanity generations that must pass."""
    fail_run: bool = False
    """Fail the stage (not only mark the round) when the guard fires."""


class GateParams(Section):
    max_task_accuracy_drop: float | None = Field(0.0, ge=0)
    """Largest fall of task accuracy (absolute) versus the policy the round started from that still promotes the
    round; None: not checked. Each threshold that is set needs the eval task that measures it in `eval.tasks`
    (`sftdpo_generation`, `sftdpo_perplexity`, `sftdpo_chosen_nll`): a threshold the gate cannot check refuses the
    round rather than pass it unchecked."""
    max_perplexity_rise: float | None = Field(None, ge=0)
    """Largest relative rise of held-out SFT-completion perplexity (1.0 = may double) that still promotes the round;
    None: not checked. Half of those completions are in the style the preference rejects, so this perplexity rises
    when a round learns the preference: `max_chosen_nll_rise` is the forgetting check that is not confounded."""
    max_chosen_nll_rise: float | None = Field(0.05, ge=0)
    """Largest relative rise of the held-out preferred completions' per-token NLL (`chosen_nll`, 0.05 = +5 %) versus
    the policy the round started from that still promotes the round; None: not checked."""
    max_chosen_nll_rise_vs_sft: float | None = Field(0.05, ge=0)
    """Largest relative rise of `chosen_nll` versus the SFT policy's that still promotes the round: the forgetting
    budget of all rounds together, which the per-round `max_chosen_nll_rise` lets compound (+5 % a round is +28 %
    after five rounds); None: not checked."""
    require_guard_ok: bool = True
    """Refuse a round the collapse guard marked failed-quality."""


class RoundParams(Section):
    previous: str
    """Policy this round starts from: `sft` for the first round, else the preceding round's name (its last promoted
    policy)."""
    reference: str = SFT_POLICY
    """Reference policy of the round: `sft` (the frozen SFT snapshot) or the same name as `previous`."""
    learning_rate: float | None = Field(None, gt=0)
    """This round's learning rate, in place of `dpo.train.learning_rate` (None: that one), e.g. to decay it over
    rounds."""
    epochs: float | None = Field(None, gt=0)
    """This round's epochs over its pairs, in place of `dpo.train.epochs` (None: that one)."""
    objective: Literal["dpo", "orpo", "simpo"] = "dpo"
    """`dpo` trains on the round's stored reference log-probs with `dpo.loss`. `orpo` and `simpo` are reference-free
    (TRL's ORPOTrainer and CPOTrainer with `loss_type: simpo`, settings in `dpo.reference_free`): no reference
    log-probs are computed for the round (less compute, no reference in memory) and `reference` is unused; the
    round is evaluated and gated like a DPO round."""

    @property
    def reference_used(self) -> str | None:
        """The policy the round's loss compares against, as its records state it: None for a reference-free round."""
        return self.reference if self.objective == "dpo" else None


class DPOParams(Section):
    method: Literal["full", "lora"] = "lora"
    """`lora` trains an adapter per round (merged into the round's policy); `full` fine-tunes every weight."""
    lora: LoraParams = LoraParams()
    """Adapter settings when `method: lora`."""
    loss: LossParams = LossParams()
    """The DPO objective (rounds with `objective: dpo`)."""
    reference_free: ReferenceFreeParams = ReferenceFreeParams()
    """Settings of ORPO and SimPO rounds (`objective: orpo` / `simpo`)."""
    sequence: SequenceParams = SequenceParams()
    """Tokenisation limits; shared by the reference log-prob stage so both see the same tokens."""
    train: TrainingParams = TrainingParams(learning_rate=2e-4, epochs=2, batch_size=8)
    """Optimisation settings of each round."""
    early_stopping: EarlyStoppingParams = EarlyStoppingParams()
    """Early stopping of each DPO round on a validation slice of its own pairs (off by default)."""
    guard: GuardParams = GuardParams()
    """Collapse guard run after each round by its own stage, `guard@<round>`, on the held-out pairs."""
    gate: GateParams = GateParams()
    """Promotion gate after each round's eval: a refused round's policy is not used by the next round or by `merge`."""
    rounds: dict[str, RoundParams] = Field(min_length=1)
    """Rounds in training order, keyed by name (`r1`, `r2`, ...). Adding one re-runs only it and what follows."""

    @model_validator(mode="after")
    def _rounds_chain(self) -> DPOParams:
        previous = SFT_POLICY
        for name, spec in self.rounds.items():
            # A message that starts with the key inside this section (`rounds.r2.previous: ...`) is reported at
            # that key's own line of params.yaml (tasks.lib.params), not at `dpo:`.
            if name in RESERVED_ROUND_NAMES or not name.isidentifier():
                raise ValueError(f"rounds.{name}: a round name must be an identifier other than {RESERVED_ROUND_NAMES}")
            if spec.previous != previous:
                raise ValueError(
                    f"rounds.{name}.previous: must be {previous!r}, the round before it (got {spec.previous!r}); "
                    "rounds form one chain, each starting from the one before"
                )
            if spec.reference not in (SFT_POLICY, spec.previous):
                raise ValueError(
                    f"rounds.{name}.reference: must be 'sft' or {spec.previous!r} (got {spec.reference!r})"
                )
            previous = name
        return self

    @property
    def final_round(self) -> str:
        return list(self.rounds)[-1]


class PromptParams(Section):
    pool: str
    """Prompt pool (JSON lines `{"prompt": ...}`, a string or a message list) the rounds draw fresh prompts from.
    Required: dvc.yaml names it (the built-in task's is `data/builtin/prompts.jsonl`)."""
    per_round: int = Field(128, ge=0)
    """Prompts drawn for each round; no prompt is reused across rounds until the pool is exhausted (then reuse is
    reported)."""
    seed: int = 0
    """Seed of the pool's shuffle (every round takes the next slice of the same shuffle)."""


class VllmParams(Section):
    python: str | None = None
    """Interpreter of vLLM's own environment, where the `generate` stage runs its sampler (vLLM pins a torch and
    transformers of its own). None: `.venv-vllm/bin/python` beside the project's environment, which `make vllm`
    builds (found from the running interpreter, so experiment and flow workspaces find it too)."""
    memory_fraction: float = Field(0.2, gt=0, le=1)
    """vLLM's `gpu_memory_utilization`: the share of GPU memory it takes for weights and KV cache (on a CPU, the
    share of RAM)."""


class GenerateParams(Section):
    backend: Literal["transformers", "vllm"] = "transformers"
    """Generation engine behind `tasks.lib.generation.GenerationBackend`: `transformers` (batched `generate`) or
    `vllm` (vLLM's engine on the stored policy's merged weights, in its own environment: `make vllm`)."""
    vllm: VllmParams = VllmParams()
    """Settings of the `vllm` backend."""
    samples_per_prompt: int = Field(4, ge=2)
    """Responses sampled per prompt (best and worst become a pair)."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass."""
    max_new_tokens: PositiveInt = 32
    """Token budget of each response."""
    batch_size: PositiveInt = 64
    """Sequences per `generate` call (prompts per call = batch_size / samples_per_prompt); padded on the left."""
    seed: int = 0
    """Sampling seed; each batch is seeded from it and its index, so a resumed round samples the same responses."""


class JudgeParams(Section):
    kind: Literal["rule", "reward_model", "function"] = "rule"
    """`rule`: the built-in task's verifier; `reward_model`: a sequence-classification model; `function`: your
    Python function."""
    correct_weight: float = 1.0
    """Rule judge: score added for a correct answer."""
    polite_weight: float = 0.5
    """Rule judge: score added for the polite closing."""
    reward_model: str | None = None
    """Reward-model judge: hub id or folder of an `AutoModelForSequenceClassification` (its first logit is the
    score)."""
    reward_model_revision: str | None = None
    """Hub revision of `reward_model`."""
    chat_template: Literal["policy", "own"] = "policy"
    """Reward-model judge: render conversations with the policy's chat template, or with the reward model's own."""
    function: str | None = None
    """Function judge: `package.module:function` called as `function(prompt, response) -> float` (prompt as in the
    data)."""
    batch_size: PositiveInt = 16
    """Reward-model judge: conversations per forward pass."""
    length_penalty: float = Field(0.0, ge=0)
    """Length control of the training signal: each sampled response's score becomes score - length_penalty x its
    tokens before pairs are built (as R-DPO / iLR-DPO penalise length). The eval's judge scores are left as the
    judge gives them."""

    @model_validator(mode="after")
    def _judge_named(self) -> JudgeParams:
        if self.kind == "reward_model" and not self.reward_model:
            raise ValueError("kind reward_model needs reward_model (a hub id or a folder)")
        if self.kind == "function" and (not self.function or ":" not in self.function):
            raise ValueError(f"kind function needs function as 'package.module:function' (got {self.function!r})")
        return self


class PairParams(Section):
    strategy: Literal["best_worst", "margin", "one_attribute"] = "best_worst"
    """`best_worst`: one pair per prompt (highest vs lowest score); `margin`: every two responses whose scores
    differ by `min_gap` or more (widest first); `one_attribute`: pairs whose responses differ in exactly one of the
    judge's attributes (the rule judge's correct / polite: same correctness, different style, or the reverse), the
    chosen one having it, at most one pair per attribute and prompt, so no pair mixes two preferences."""
    min_gap: float = Field(0.25, gt=0)
    """Smallest score difference that makes a pair; closer responses (ties) are dropped and counted."""
    max_pairs_per_prompt: PositiveInt = 4
    """With `strategy: margin` or `one_attribute`, the largest number of pairs kept per prompt (widest gaps
    first). Counted over sampled responses, so identical samples make identical pairs, which validation then drops
    as duplicates: the built-in task's round 1 keeps 826 distinct pairs of 1,800 at 4 (README, ablations)."""
    min_chosen_score: float | None = None
    """Keep only pairs whose chosen response scores at least this (None: any). With the rule judge, 1.0 keeps only
    pairs whose chosen answer is correct, as Iterative RPO builds its pairs (arXiv 2404.19733: winners with the
    right final answer, losers with a wrong one): a prompt where no sample is correct then gives no pair instead of
    teaching its least wrong answer."""
    max_length_difference: int | None = Field(None, ge=0)
    """Length-matched pairs: chosen and rejected may differ by at most this many tokens (None: any), so a pair cannot
    teach length instead of quality; the widest-gap pair within it is taken."""
    max_similarity: float | None = Field(None, gt=0, le=1)
    """Drop near-identical pairs: responses whose character similarity (difflib ratio, 1 = identical) is above this
    (None: keep all). Pairs that differ in a few tokens are where DPO displaces likelihood from the chosen answer
    (DPOP, arXiv 2402.13228)."""
    replay_fraction: float = Field(0.0, ge=0, le=1)
    """Replay earlier rounds' pairs: this fraction of the pairs the round's starting policy was trained on, drawn at
    random (seeded by `onpolicy.generate.seed`), joins the round's fresh pairs (1: all of them, so each round trains on
    every earlier round's pairs too; 0: off; round 1 starts from SFT, trained on no pairs). Those carried their own
    round's replay, so a round k rounds back contributes `replay_fraction^k` of its pairs. Llama 2's iterative RLHF
    kept earlier iterations' samples in later ones against forgetting (arXiv 2307.09288, section 3.2.3)."""


class OnPolicyParams(Section):
    prompts: PromptParams
    """Where each round's fresh prompts come from."""
    generate: GenerateParams = GenerateParams()
    """Sampling responses from the round's starting policy."""
    judge: JudgeParams = JudgeParams()
    """Scoring every sampled response."""
    pairs: PairParams = PairParams()
    """Turning scored responses into preference pairs."""

    @model_validator(mode="after")
    def _attributes_judged(self) -> OnPolicyParams:
        if self.pairs.strategy == "one_attribute" and self.judge.kind != "rule":
            raise ValueError(
                "pairs.strategy: one_attribute needs a judge that reports attributes (judge.kind: rule); "
                f"judge.kind is {self.judge.kind}"
            )
        return self


class MergeParams(Section):
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the adapter is merged and the standalone model saved in."""
    max_shard_size: str = "5GB"
    """Largest safetensors shard of the saved model."""


class EvalParams(Section):
    batch_size: PositiveInt = 16
    """lm-eval batch size."""
    max_new_tokens: PositiveInt = 32
    """Greedy generation budget of the task-accuracy task."""
    limit: PositiveInt | None = None
    """Evaluate only the first N documents of each task (None: all)."""
    tasks: list[str] = Field(default_factory=lambda: list(PROJECT_EVAL_TASKS), min_length=1)
    """lm-eval tasks run on every model: the project's own (`sftdpo_preference`, `sftdpo_generation`,
    `sftdpo_perplexity`, `sftdpo_chosen_nll`: per-token NLL of the held-out preferred completions, the forgetting
    measure the gate reads; `sftdpo_text_nll`: per-token NLL of the held-out prompts' plain text), any task lm-eval
    knows by name (`gsm8k`, `ifeval`, `arc_easy`, ...; offline they read the local Hugging Face cache), or the path
    of your own task YAML (`include:` and `!function` resolve beside it; keep it under `tasks/lm_eval_tasks/` so
    DVC re-runs the evals when it changes). Other tasks' metrics join `metrics/eval.json` as `<task>/<metric>`."""
    kl_samples: int = Field(4, ge=0)
    """Responses sampled (temperature 1) per held-out prompt to estimate each model's KL from the SFT policy
    (`kl_to_sft`); 0 skips the estimate."""
    seed: int = 0
    """Seed of those samples."""

    @model_validator(mode="after")
    def _task_files_exist(self) -> EvalParams:
        from pathlib import Path

        missing = [task for task in self.tasks if task.endswith((".yaml", ".yml")) and not Path(task).is_file()]
        if missing:
            raise ValueError(f"no such task YAML: {', '.join(missing)} (paths are relative to the project folder)")
        return self


class NextRoundParams(Section):
    cron: str | None = None
    """Cron schedule of the `sft-dpo/next-round` deployment (e.g. `0 3 * * *`); null serves it unscheduled."""
    timezone: str = "UTC"
    """Time zone the cron schedule is read in."""
    reference: Literal["sft", "previous"] = SFT_POLICY
    """Reference of an appended round: the frozen SFT snapshot, or the policy the round starts from."""

    @model_validator(mode="after")
    def _schedule_parses(self) -> NextRoundParams:
        if self.cron is not None:
            # Prefect's own schedule model, so a schedule that validates here is one the deployment accepts.
            from prefect.client.schemas.schedules import CronSchedule

            try:
                CronSchedule(cron=self.cron, timezone=self.timezone)
            except ValueError as error:
                reason = error.errors()[0]["msg"].removeprefix("Value error, ")
                raise ValueError(f"cron {self.cron!r} / timezone {self.timezone!r}: {reason}") from None
        return self


class OrchestrationParams(Section):
    retries: int = Field(2, ge=0)
    """Times the Prefect flow re-runs a failed stage before failing (a stage that refuses its input is never
    retried)."""
    retry_delay_seconds: float = Field(30.0, ge=0)
    """Wait before each retry of a failed stage."""
    next_round: NextRoundParams = NextRoundParams()
    """The `sft-dpo/next-round` deployment: its schedule and the appended round's reference."""


class TrackingParams(Section):
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = ["tensorboard"]
    """Where the training stages (`sft`, `dpo`) log their curves: TensorBoard into the stage's `logs/` folder (a DVC
    output), W&B into `wandb_dir`, MLflow into `mlflow_tracking_uri`. No stage depends on this section: turning a
    tracker on logs the next run of a stage and re-runs nothing (`dvc repro -f <stage>` logs one again)."""
    wandb_project: str = "sft-dpo"
    """W&B project of the runs."""
    wandb_mode: Literal["offline", "online"] = "offline"
    """`offline` writes runs to `wandb_dir` only (upload later with `wandb sync`); `online` sends them (needs a
    login). A `WANDB_MODE` in the environment wins."""
    wandb_dir: str = "wandb"
    """Folder W&B writes its runs into (relative to the project; git-ignored)."""
    mlflow_tracking_uri: str = "mlflow.db"
    """MLflow store: a file path (a local SQLite store, relative to the project; git-ignored; `mlflow ui
    --backend-store-uri sqlite:///mlflow.db` shows it) or a tracking server URL. A `MLFLOW_TRACKING_URI` in the
    environment wins."""
    mlflow_experiment: str = "sft-dpo"
    """MLflow experiment the runs are logged under."""


DISTRIBUTED_STAGES = ("sft", "dpo", "reference_logps", "generate", "judge", "eval")
"""Stage kinds that share their work across `compute.processes` processes; the others always run on one."""
ACCELERATE_CONFIGS_DIR = "configs/accelerate"


class ComputeParams(Section):
    processes: PositiveInt = 1
    """Processes per machine for the stages that share their work: `sft` and `dpo` (data parallel: each process
    trains on `batch_size` rows per step, so one optimizer step sees batch_size x gradient_accumulation x
    processes rows, and the gradients are averaged), `reference_logps`, `generate`, `judge` and `eval` (work sharded
    by batch or, for eval, by lm-eval's data-parallel mode; gathered and written once, as one process writes it).
    One per GPU on a GPU machine; on a CPU, gloo
    processes. The other stages run on one process. `sft` and `dpo` depend on this key (it changes the global
    batch); nothing else does."""
    launcher: Literal["torchrun", "accelerate"] = "torchrun"
    """How a stage starts its processes when it uses more than one: `torchrun --standalone --nproc_per_node`
    (works on a CPU), or `accelerate launch` with `accelerate_config` (DeepSpeed, FSDP; on a CPU, accelerate
    starts one process unless MPI is set up: use torchrun)."""
    accelerate_config: str | None = None
    """An accelerate config file for `launcher: accelerate` (configs/accelerate/ ships DDP, FSDP and DeepSpeed
    ZeRO-2/ZeRO-3 examples); its process count is replaced by the stage's."""
    stage_processes: dict[Literal["sft", "dpo", "reference_logps", "generate", "judge", "eval"], PositiveInt] = {}
    """A stage kind's own process count, in place of `processes` (e.g. `{generate: 1}`)."""

    def processes_for(self, stage_kind: str) -> int:
        """How many processes a stage of this kind runs on."""
        if stage_kind not in DISTRIBUTED_STAGES:
            return 1
        return self.stage_processes.get(stage_kind, self.processes)

    @model_validator(mode="after")
    def _accelerate_needs_a_config(self) -> ComputeParams:
        if self.launcher == "accelerate" and self.accelerate_config is None:
            raise ValueError(f"launcher accelerate needs accelerate_config (a file in {ACCELERATE_CONFIGS_DIR}/)")
        return self


class StorageParams(Section):
    remote: str | None = None
    """A DVC remote (a URL DVC understands: a shared folder, `s3://...`, `ssh://...`) that the Prefect flow
    pulls what a run needs from before it starts, pushes each stage's outputs to when the stage completes, and
    checks (`dvc status --cloud` clean) before it reports the run done; a failed push fails the run. It is
    configured as the project's local default remote `sft-dpo` (`.dvc/config.local`), so a clone on another
    machine with the same params reuses every output pushed there. No stage depends on it."""


class Params(Section):
    data: DataParams
    """Input data and how it is validated and split."""
    model: ModelParams = ModelParams()
    """The base model and how every model is loaded."""
    sft: SFTParams = SFTParams()
    """Supervised fine-tuning."""
    reference: ReferenceParams = ReferenceParams()
    """The frozen reference policy and its log-probabilities."""
    onpolicy: OnPolicyParams
    """Each round's fresh preference data: prompts, sampled responses, judge scores, pairs."""
    dpo: DPOParams
    """DPO rounds."""
    merge: MergeParams = MergeParams()
    """The standalone exported model."""
    eval: EvalParams = EvalParams()
    """lm-eval evaluation of every model."""
    tracking: TrackingParams = TrackingParams()
    """Experiment trackers the training stages log to (TensorBoard, W&B, MLflow)."""
    orchestration: OrchestrationParams = OrchestrationParams()
    """The Prefect flows (no stage reads these, so changing them re-runs nothing)."""
    compute: ComputeParams = ComputeParams()
    """How many processes the stages that can share their work run on, and how they are launched."""
    storage: StorageParams = StorageParams()
    """Where the flow shares outputs with other machines (a DVC remote)."""

    @model_validator(mode="after")
    def _vllm_on_one_process(self) -> Params:
        if self.onpolicy.generate.backend == "vllm" and self.compute.processes_for("generate") > 1:
            raise ValueError(
                "onpolicy.generate.backend: vllm runs one engine that batches every prompt itself; give generate one "
                "process (compute.stage_processes: {generate: 1})"
            )
        return self

    @model_validator(mode="after")
    def _gate_thresholds_measured(self) -> Params:
        for key, task in GATE_THRESHOLD_TASKS.items():
            if getattr(self.dpo.gate, key) is not None and task not in self.eval.tasks:
                raise ValueError(
                    f"dpo.gate.{key}: its metric comes from the eval task {task}, which eval.tasks leaves out; "
                    f"add {task} to eval.tasks, or set dpo.gate.{key}: null to promote without that check"
                )
        return self

    @model_validator(mode="after")
    def _quantization_needs_lora(self) -> Params:
        if self.model.quantization != "none" and self.dpo.method != "lora":
            raise ValueError("model.quantization needs dpo.method: lora (quantized weights cannot be fully fine-tuned)")
        return self
