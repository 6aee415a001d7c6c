"""Stage `reference_logps@<round>`: log-probabilities of a round's pairs under its reference policy.

Computed once, by TRL's own precompute pass (same tokenisation and truncation as training), and
stored as a DVC output. DPO then trains with no reference model in memory, and a change of
`dpo.loss.beta` (or any other training setting) does not recompute them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tasks.common import atomic_path, load_tokenizer, stage_params
from tasks.config import Params
from tasks.records import write_records

REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
PAIR_COLUMNS = ("prompt", "chosen", "rejected")


def dpo_sequence_config(params: Params, checkpoint_dir: Path, **extra):
    """A DPOConfig carrying the tokenisation settings shared by this stage and DPO training."""
    from trl import DPOConfig

    from tasks.common import has_cuda

    settings = {
        "output_dir": str(checkpoint_dir),
        "max_length": params.dpo.sequence.max_length,
        "truncation_mode": params.dpo.sequence.truncation_mode,
        "use_cpu": not has_cuda(),
        "bf16": False,
        "report_to": [],
    }
    return DPOConfig(**{**settings, **extra})


def compute_reference_logps(params: Params, reference: Path, pairs: Path, eval_pairs: Path, out: Path) -> None:
    import tempfile

    from datasets import load_dataset
    from trl import DPOTrainer

    from tasks.common import load_model

    tokenizer = load_tokenizer(str(reference), params.model)
    model = load_model(str(reference), params.model)
    data = load_dataset("json", data_files={"train": str(pairs), "eval": str(eval_pairs)})
    with tempfile.TemporaryDirectory() as scratch_dir:
        config = dpo_sequence_config(
            params,
            Path(scratch_dir),
            precompute_ref_log_probs=True,
            precompute_ref_batch_size=params.reference.batch_size,
        )
        trainer = DPOTrainer(
            model=model, args=config, train_dataset=data["train"], eval_dataset=data["eval"], processing_class=tokenizer
        )
        splits = {"train": trainer.train_dataset, "eval": trainer.eval_dataset}
        with atomic_path(out) as scratch:
            scratch.mkdir()
            for name, dataset in splits.items():
                rows = dataset.select_columns(list(PAIR_COLUMNS + REF_COLUMNS)).to_list()
                write_records(scratch / f"{name}.jsonl", rows)
                print(f"reference log-probs: {len(rows)} {name} pairs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--reference", type=Path, required=True, help="the round's reference policy folder")
    parser.add_argument("--pairs", type=Path, required=True, help="the round's prepared training pairs")
    parser.add_argument("--eval-pairs", type=Path, required=True, help="prepared held-out pairs")
    parser.add_argument("--out", type=Path, required=True, help="folder for train.jsonl and eval.jsonl")
    args = parser.parse_args()
    params = stage_params(args.params)
    compute_reference_logps(params, args.reference, args.pairs, args.eval_pairs, args.out)


if __name__ == "__main__":
    main()
