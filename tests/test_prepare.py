"""tasks/prepare.py, and the pairs files a user drops in for a round (tasks/prompts.py validates them,
tasks/pairs.py reports on them): bad lines are reported as file:line and nothing is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.base import build_base
from tasks.lib.errors import DataError
from tasks.lib.params import load_params
from tasks.lib.records import read_records
from tasks.pairs import build_pairs
from tasks.prepare import prepare
from tasks.prompts import draw_prompts, incoming_pairs

ROOT = Path(__file__).resolve().parents[1]
GOOD_PAIR = {"prompt": "2+2?", "chosen": " 4", "rejected": " 5"}
CHAT_PAIR = {
    "prompt": [{"role": "user", "content": "你好吗？"}],
    "chosen": [{"role": "assistant", "content": "很好 🙂"}],
    "rejected": [{"role": "assistant", "content": "不好"}],
}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:

    out = tmp_path_factory.mktemp("base") / "base"
    build_base(load_params(ROOT / "params.yaml"), ROOT / "data/builtin/sft.jsonl", out)
    return out


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"prompt": "a", "chosen": "b"}), "missing field 'rejected'"),
        (json.dumps({"prompt": "a", "chosen": "  ", "rejected": "c"}), "'chosen' is empty"),
        (json.dumps({"prompt": "a", "chosen": "b", "rejected": "b"}), "'chosen' is identical to 'rejected'"),
        (json.dumps({"prompt": "a", "chosen": 3, "rejected": "c"}), "'chosen' must be a string"),
        (json.dumps(["a", "b"]), "expected a JSON object"),
    ],
)
def test_each_bad_human_pair_line_is_reported_and_nothing_written(tmp_path, line, reason):
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    pairs = write_lines(incoming / "r1.jsonl", [json.dumps(GOOD_PAIR), line])
    outputs = [tmp_path / "prompts.jsonl", tmp_path / "human.jsonl", tmp_path / "report.json"]
    with pytest.raises(DataError) as error:
        draw_prompts(load_params(ROOT / "params.yaml"), "r1", ROOT / "data/builtin/prompts.jsonl", incoming, *outputs)
    assert f"{pairs}:2: {reason}" in str(error.value)
    assert not any(path.exists() for path in outputs)


def human_pairs_report(params, pairs: Path, base: Path, tmp_path: Path) -> dict:
    """The pairs stage's report on a round with no judged responses and `pairs` as its human pairs."""
    scored = write_lines(tmp_path / "scored.jsonl", [])
    return build_pairs(params, scored, pairs, base, base, tmp_path / "out.jsonl", tmp_path / "report.json")


def test_bad_sft_lines_fail_prepare_with_every_line_listed(tmp_path, base):
    sft = write_lines(
        tmp_path / "sft.jsonl",
        [
            json.dumps({"prompt": "a", "completion": "b"}),
            json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
            json.dumps({"prompt": "a"}),
        ],
    )
    outputs = [tmp_path / name for name in ("train.jsonl", "heldout.jsonl", "pairs.jsonl", "report.json")]
    with pytest.raises(DataError) as error:
        prepare(load_params(ROOT / "params.yaml"), sft, ROOT / "data/builtin/eval_pairs.jsonl", base, *outputs)
    assert f"{sft}:2: 'messages' has no assistant message" in str(error.value)
    assert f"{sft}:3: missing field 'completion'" in str(error.value)
    assert not any(path.exists() for path in outputs)


def test_sft_file_mixing_formats_is_refused_at_the_first_row_of_the_minority_format(tmp_path, base):
    conversation = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    rows = [json.dumps({"prompt": f"{i}+{i}=", "completion": str(2 * i)}) for i in range(4)]
    sft = write_lines(tmp_path / "sft.jsonl", rows[:2] + [json.dumps(conversation)] + rows[2:])
    outputs = [tmp_path / name for name in ("train.jsonl", "heldout.jsonl", "pairs.jsonl", "report.json")]
    with pytest.raises(DataError) as error:
        prepare(load_params(ROOT / "params.yaml"), sft, ROOT / "data/builtin/eval_pairs.jsonl", base, *outputs)
    assert f"{sft}:3: a conversational row in a file of standard rows (4 of 5)" in str(error.value)
    assert not any(path.exists() for path in outputs)


def test_drop_policy_drops_within_budget_and_reports_why(tmp_path, base):
    rows = [json.dumps({**GOOD_PAIR, "prompt": f"{i} plus {i}?"}) for i in range(30)] + [
        "oops",
        json.dumps(GOOD_PAIR) * 1,
    ]
    rows.append(json.dumps(GOOD_PAIR))  # a duplicate
    pairs = write_lines(tmp_path / "pairs.jsonl", rows)
    params = load_params(ROOT / "params.yaml", {"data.on_bad_lines": "drop", "data.max_bad_fraction": 0.1})
    rows, report = incoming_pairs(params, pairs, "standard")
    assert report["dropped"] == 1 and report["dropped_reasons"] == {"not valid JSON (Expecting value)": 1}
    assert report["dropped_lines"] == [f"{pairs}:31: not valid JSON (Expecting value)"]
    assert report["duplicates_removed"] == 1 and report["kept"] == 31 == len(rows)
    strict = load_params(ROOT / "params.yaml", {"data.on_bad_lines": "drop", "data.max_bad_fraction": 0.01})
    with pytest.raises(DataError, match="more than data.max_bad_fraction"):
        incoming_pairs(strict, pairs, "standard")


def test_report_counts_truncation_and_token_lengths_of_training_pairs(tmp_path, base):
    long_pair = {**GOOD_PAIR, "chosen": " four" * 200}
    pairs = write_lines(tmp_path / "pairs.jsonl", [json.dumps(GOOD_PAIR), json.dumps(long_pair)])
    report = human_pairs_report(load_params(ROOT / "params.yaml"), pairs, base, tmp_path)
    assert report["truncated_rows"] == 1 and report["tokens_max"] > report["max_length"]
    assert report["human_pairs"] == report["pairs"] == 2 and report["chosen_chars_mean"] > report["rejected_chars_mean"]


def test_conversational_chinese_and_emoji_pairs_are_valid(tmp_path):
    result = read_records(write_lines(tmp_path / "zh.jsonl", [json.dumps(CHAT_PAIR, ensure_ascii=False)]), "pairs")
    assert not result.bad and result.rows == [CHAT_PAIR]


@pytest.mark.parametrize("path", sorted((ROOT / "data" / "builtin").glob("*pairs*.jsonl")), ids=lambda path: path.name)
def test_every_shipped_pairs_file_is_clean(path):
    """Rounds appended later (r3, r4) read these files too: none may hold a degenerate pair."""
    result = read_records(path, "pairs")
    assert result.bad == [] and len(result.rows) == len(path.read_text().splitlines())
