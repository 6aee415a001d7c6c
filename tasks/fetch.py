"""Stage `fetch@<name>`: one hub dataset of `data.hub`, loaded with `datasets.load_dataset` and saved for the pipeline.

The output is a `save_to_disk` folder that any data key can name, with `source.json` recording the hub id, split,
subset, the pinned revision and the revision actually loaded. DVC caches the folder, so later runs read the rows
fetched here, not whatever the hub holds by then. Offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE), only the local
Hugging Face cache is read.
"""

from __future__ import annotations

import re
from pathlib import Path

from tasks.lib.errors import DataError, SettingError
from tasks.lib.files import atomic_path, write_json
from tasks.lib.records import HUB_SOURCE_FILE
from tasks.lib.schema import HubDatasetParams, Params
from tasks.lib.stage import stage_main

COMMIT_SHA = re.compile(r"[0-9a-f]{40}")


def describe(spec: HubDatasetParams) -> str:
    details = [f"split {spec.split}"]
    if spec.subset:
        details.append(f"subset {spec.subset}")
    details.append(f"revision {spec.revision or 'default branch'}")
    return f"{spec.id} ({', '.join(details)})"


def load_hub_dataset(spec: HubDatasetParams, key: str):
    """The split `spec` names, or DataError naming the params key, the dataset and why it could not be loaded."""
    import datasets

    try:
        return datasets.load_dataset(spec.id, spec.subset, split=spec.split, revision=spec.revision)
    except Exception as error:  # re-raised with the params key and the dataset named; the cause is kept
        offline = datasets.config.HF_HUB_OFFLINE or datasets.config.HF_DATASETS_OFFLINE
        hint = (
            f"; offline, only the local cache ({datasets.config.HF_DATASETS_CACHE}) is read: load it once online "
            "with the same id, subset and split, or copy that cache here"
            if offline
            else ""
        )
        raise DataError(f"{key}: {describe(spec)} could not be loaded: {error}{hint}") from error


def loaded_revision(dataset) -> str | None:
    """The commit a loaded hub dataset came from: `datasets` caches a hub dataset in a folder named after it."""
    for cache_file in dataset.cache_files:
        folder = Path(cache_file["filename"]).parent.name
        if COMMIT_SHA.fullmatch(folder):
            return folder
    return None


def fetch(params: Params, dataset: str, out: Path) -> dict:
    """Load `data.hub.<dataset>` and save it as a `save_to_disk` folder with its `source.json`.

    Args:
        params: the pipeline's params (`data.hub`)
        dataset: the name of the dataset, a key of `data.hub`
        out: the folder to write (data/hub/<dataset>)
    """
    key = f"data.hub.{dataset}"
    if dataset not in params.data.hub:
        raise SettingError(f"--dataset {dataset}: not a key of data.hub ({', '.join(params.data.hub) or 'empty'})")
    spec = params.data.hub[dataset]
    rows = load_hub_dataset(spec, key)
    revision = loaded_revision(rows)
    if spec.revision and COMMIT_SHA.fullmatch(spec.revision) and revision and revision != spec.revision:
        raise DataError(
            f"{key}: {spec.id} pins revision {spec.revision}, but the copy loaded is revision {revision} "
            "(offline, datasets falls back to the newest cached copy): fetch the pinned revision online, "
            "or pin this one"
        )
    source = {
        "id": spec.id,
        "split": spec.split,
        "subset": spec.subset,
        "revision": spec.revision,
        "loaded_revision": revision,
        "rows": len(rows),
        "columns": rows.column_names,
    }
    with atomic_path(out) as scratch:
        rows.save_to_disk(str(scratch))
        write_json(scratch / HUB_SOURCE_FILE, source)
    print(f"{key}: {len(rows)} rows of {describe(spec)}, loaded revision {revision or 'unknown'} -> {out}")
    return source


if __name__ == "__main__":
    stage_main(fetch)
