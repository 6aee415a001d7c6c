"""tasks/fetch.py: a hub dataset named in `data.hub`, loaded offline from the local `datasets` cache, pinned by
revision, saved as a folder the data stages read. The cache is made here the way `datasets` lays out a hub
dataset it has loaded once (namespace___name/config/version/commit), since no hub can be reached."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tasks.lib.records import read_records

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
PAIRS = [
    {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."},
    {"prompt": "Name a fruit.", "chosen": "An apple.", "rejected": "A chair."},
]


def cache_hub_dataset(cache: Path, repo_id: str, rows: list[dict], commit: str) -> None:
    """Write `rows` into `cache` where `datasets` keeps hub dataset `repo_id` at `commit`, split `train`."""
    from datasets.packaged_modules.json.json import Json

    source = cache / "rows.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    name = repo_id.split("/")[1]
    builder = Json(cache_dir=str(cache), dataset_name=name, data_files={"train": str(source)}, hash=commit)
    builder.download_and_prepare()
    # A hub dataset's default configuration is cached as `default`, under `namespace___name`.
    (config,) = (cache / name).glob("default-*")
    config.rename(cache / name / "default")
    (cache / name).rename(cache / repo_id.replace("/", "___"))


def run_fetch(tmp_path: Path, cache: Path, spec: dict) -> subprocess.CompletedProcess:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["hub"] = {"prefs": spec}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "tasks.fetch", "--params", str(tmp_path / "params.yaml"), "--dataset", "prefs"]
    return subprocess.run(
        [*command, "--out", str(tmp_path / "hub/prefs")], cwd=ROOT, env=env, capture_output=True, text=True
    )


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("hf-datasets-cache")
    cache_hub_dataset(cache, "sftdpo-test/tiny_prefs", PAIRS, COMMIT)
    return cache


def test_a_cached_hub_dataset_is_fetched_pinned_and_read_like_a_local_folder(tmp_path, cache):
    result = run_fetch(tmp_path, cache, {"id": "sftdpo-test/tiny_prefs", "split": "train", "revision": COMMIT})
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "hub/prefs"
    source = json.loads((folder / "source.json").read_text())
    assert source == {
        "id": "sftdpo-test/tiny_prefs",
        "split": "train",
        "subset": None,
        "revision": COMMIT,
        "loaded_revision": COMMIT,
        "rows": 2,
        "columns": ["prompt", "chosen", "rejected"],
    }
    records = read_records(folder, "pairs", "auto")
    assert records.rows == PAIRS and not records.bad


def test_a_pinned_revision_the_cache_does_not_hold_is_refused(tmp_path, cache):
    other = "f" * 40
    result = run_fetch(tmp_path, cache, {"id": "sftdpo-test/tiny_prefs", "revision": other})
    assert result.returncode == 2
    assert (
        f"data.hub.prefs: sftdpo-test/tiny_prefs pins revision {other}, but the copy loaded is revision {COMMIT}"
        in (result.stderr)
    )
    assert not (tmp_path / "hub/prefs").exists()


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ({"id": "sftdpo-test/not_cached"}, "Couldn't reach 'sftdpo-test/not_cached' on the Hub"),
        ({"id": "sftdpo-test/tiny_prefs", "split": "test"}, 'Unknown split "test"'),
        (
            {"id": "sftdpo-test/tiny_prefs", "subset": "other"},
            "Couldn't find cache for sftdpo-test/tiny_prefs for config",
        ),
    ],
)
def test_what_the_offline_cache_lacks_is_one_clear_error(tmp_path, cache, spec, reason):
    result = run_fetch(tmp_path, cache, spec)
    assert result.returncode == 2
    assert f"data.hub.prefs: {spec['id']}" in result.stderr and reason in result.stderr
    assert "offline, only the local cache" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "hub/prefs").exists()
