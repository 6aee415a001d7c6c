"""Stage `reference_logps@<round>`: log-probabilities of a round's training pairs under its reference policy.

Computed once, by TRL's own precompute pass (same tokenisation and truncation as training), and
stored as a DVC output. DPO then trains with no reference model in memory, and a change of
`dpo.loss.beta` (or any other training setting) does not recompute them. The held-out pairs are not here:
`guard@<round>` scores them after training, so a new held-out set re-runs the guard and evaluation, never DPO.
With early stopping on (`dpo.early_stopping.patience`), a seeded `validation_fraction` of the round's pairs is
set aside as `validation.jsonl`, the set the round is stopped on. A round whose objective is reference-free
(ORPO, SimPO) gets its pairs without log-probs, and no reference is loaded.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

from tasks.lib.distributed import is_main
from tasks.lib.errors import DataError
from tasks.lib.files import atomic_path, load_records, write_records
from tasks.lib.schema import SFT_POLICY, EarlyStoppingParams, Params
from tasks.lib.stage import stage_main
from tasks.lib.training import PAIR_COLUMNS, REF_COLUMNS, pairs_only, reference_logps_datasets


def compute_reference_logps(params: Params, reference: Path, splits: dict[str, Path], out: Path) -> None:
    """Store each split's pairs with their log-probabilities under the reference, as `<split>.jsonl` in `out`.

    Args:
        params: the pipeline's params
        reference: the round's reference policy folder
        splits: pairs files by split name ("train", and "validation" with early stopping on)
        out: the folder
    """
    datasets = reference_logps_datasets(params, reference, splits)
    if not is_main():
        return  # rank 0 writes
    with atomic_path(out) as scratch:
        scratch.mkdir()
        for name, dataset in datasets.items():
            rows = dataset.select_columns(list(PAIR_COLUMNS + REF_COLUMNS)).to_list()
            write_records(scratch / f"{name}.jsonl", rows)
            print(f"reference log-probs: {len(rows)} {name} pairs")


def validation_split(pairs: Path, settings: EarlyStoppingParams, seed: int, scratch: Path) -> dict[str, Path]:
    """The round's pairs as train (and, with early stopping on, a seeded validation slice), written in `scratch`.

    The round is stopped on pairs of its own distribution that it does not train on; stopping on the held-out
    set the evaluation reports would select each round on its own test set.
    """
    if settings.patience is None:
        return {"train": pairs}
    rows = load_records(pairs)
    count = max(1, round(len(rows) * settings.validation_fraction))
    if count >= len(rows):
        raise DataError(
            f"{pairs}: {len(rows)} pairs leave none to train on after dpo.early_stopping.validation_fraction "
            f"{settings.validation_fraction} is set aside for early stopping"
        )
    chosen = set(random.Random(seed).sample(range(len(rows)), count))
    files = {"train": scratch / "train.jsonl", "validation": scratch / "validation.jsonl"}
    write_records(files["train"], [row for i, row in enumerate(rows) if i not in chosen])
    write_records(files["validation"], [row for i, row in enumerate(rows) if i in chosen])
    return files


def round_reference_logps(
    params: Params, round_name: str, sft_policy: Path, previous_policy: Path, pairs: Path, out: Path
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
        out: folder for train.jsonl (and validation.jsonl with early stopping on)
    """
    spec = params.dpo.rounds[round_name]
    with tempfile.TemporaryDirectory() as scratch:
        splits = validation_split(pairs, params.dpo.early_stopping, params.dpo.train.seed, Path(scratch))
        if spec.objective != "dpo":
            write_pairs_only(splits, out)
            print(f"reference_logps@{round_name}: none computed, the objective ({spec.objective}) has no reference")
            return
        reference = sft_policy if spec.reference == SFT_POLICY else previous_policy
        print(f"reference_logps@{round_name}: reference {spec.reference} ({reference})")
        compute_reference_logps(params, reference, splits, out)


def write_pairs_only(splits: dict[str, Path], out: Path) -> None:
    """The round's folder for a reference-free objective: the same splits, without reference columns."""
    with atomic_path(out) as scratch:
        scratch.mkdir()
        for name, source in splits.items():
            write_records(scratch / f"{name}.jsonl", pairs_only(source))


if __name__ == "__main__":
    stage_main(round_reference_logps)
