"""Stage `reference_logps@<round>`: log-probabilities of a round's pairs under its reference policy.

Computed once, by TRL's own precompute pass (same tokenisation and truncation as training), and
stored as a DVC output. DPO then trains with no reference model in memory, and a change of
`dpo.loss.beta` (or any other training setting) does not recompute them. A round whose objective is
reference-free (ORPO, SimPO) gets its pairs without log-probs, and no reference is loaded.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from tasks.lib.distributed import is_main
from tasks.lib.files import atomic_path, load_records, load_splits, write_records
from tasks.lib.policies import load_model, load_tokenizer
from tasks.lib.schema import SFT_POLICY, Params
from tasks.lib.stage import stage_main
from tasks.lib.training import PAIR_COLUMNS, REF_COLUMNS, dpo_sequence_config, dpo_trainer_class


def compute_reference_logps(params: Params, reference: Path, pairs: Path, eval_pairs: Path, out: Path) -> None:
    """Store the round's pairs (and the held-out pairs) with their log-probabilities under the reference.

    Args:
        params: the pipeline's params
        reference: the round's reference policy folder
        pairs: the round's prepared training pairs
        eval_pairs: prepared held-out pairs
        out: folder for train.jsonl and eval.jsonl
    """
    tokenizer = load_tokenizer(str(reference), params.model)
    model = load_model(str(reference), params.model)
    data = load_splits({"train": pairs, "eval": eval_pairs})
    with tempfile.TemporaryDirectory() as scratch_dir:
        config = dpo_sequence_config(
            params,
            Path(scratch_dir),
            precompute_ref_log_probs=True,
            precompute_ref_batch_size=params.reference.batch_size,
        )
        trainer = dpo_trainer_class()(
            model=model, args=config, train_dataset=data["train"], eval_dataset=data["eval"], processing_class=tokenizer
        )
        splits = {"train": trainer.train_dataset, "eval": trainer.eval_dataset}
        if not is_main():
            return  # TRL's precompute shards the batches and gathers them in order on every process; rank 0 writes
        with atomic_path(out) as scratch:
            scratch.mkdir()
            for name, dataset in splits.items():
                rows = dataset.select_columns(list(PAIR_COLUMNS + REF_COLUMNS)).to_list()
                write_records(scratch / f"{name}.jsonl", rows)
                print(f"reference log-probs: {len(rows)} {name} pairs")


def round_reference_logps(
    params: Params, round_name: str, sft_policy: Path, previous_policy: Path, pairs: Path, eval_pairs: Path, out: Path
) -> None:
    """Compute round `round_name`'s reference log-probs under the reference its params name.

    Both candidate references are arguments (and DVC dependencies), so dvc.yaml needs no `reference` key
    of the round: a round written without one gets the schema's default, `sft`.

    Args:
        params: the pipeline's params
        round_name: the round, a key of `dpo.rounds`
        sft_policy: the frozen SFT snapshot (the reference when the round's `reference` is `sft`)
        previous_policy: the policy the round starts from (the reference when `reference` names it)
        pairs: the round's prepared training pairs
        eval_pairs: prepared held-out pairs
        out: folder for train.jsonl and eval.jsonl
    """
    spec = params.dpo.rounds[round_name]
    if spec.objective != "dpo":
        write_pairs_only(pairs, eval_pairs, out)
        print(f"reference_logps@{round_name}: none computed, the round's objective ({spec.objective}) has no reference")
        return
    reference = sft_policy if spec.reference == SFT_POLICY else previous_policy
    print(f"reference_logps@{round_name}: reference {spec.reference} ({reference})")
    compute_reference_logps(params, reference, pairs, eval_pairs, out)


def write_pairs_only(pairs: Path, eval_pairs: Path, out: Path) -> None:
    """The round's folder for a reference-free objective: the same splits, without reference columns."""
    with atomic_path(out) as scratch:
        scratch.mkdir()
        for name, source in (("train", pairs), ("eval", eval_pairs)):
            rows = [{column: row[column] for column in PAIR_COLUMNS} for row in load_records(source)]
            write_records(scratch / f"{name}.jsonl", rows)


if __name__ == "__main__":
    stage_main(round_reference_logps)
