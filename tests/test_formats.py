"""tasks/lib/formats.py and the sources tasks/lib/records.py reads: each format converted field by field, each source
kind read, every bad row named, LLaMA-Factory's real demo files converted without a bad row; prepare's sampling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REAL

from tasks.lib.errors import DataError
from tasks.lib.formats import FormatProblem, detect, to_trl
from tasks.lib.params import load_params
from tasks.lib.records import read_records
from tasks.prepare import prepare, sample

ROOT = Path(__file__).resolve().parents[1]
LLAMAFACTORY = REAL / "data" / "llamafactory"

SHAREGPT_PAIR = {
    "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Hello!"},
        {"from": "human", "value": "2+2?"},
    ],
    "chosen": {"from": "gpt", "value": "4"},
    "rejected": {"from": "gpt", "value": "5"},
}
HH_PAIR = {
    "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: 2+2?\n\nAssistant: 4",
    "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: 2+2?\n\nAssistant: 5",
}
ALPACA_SFT = {"instruction": "Add the numbers.", "input": "2 and 2", "output": "4", "system": "Be brief."}


def test_sharegpt_pair_becomes_a_conversational_trl_pair():
    assert detect(SHAREGPT_PAIR) == "sharegpt"
    assert to_trl(SHAREGPT_PAIR, "pairs") == {
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "2+2?"},
        ],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
    }


def test_sharegpt_sft_and_prompt_rows():
    conversation = {"conversations": SHAREGPT_PAIR["conversations"][1:3], "system": "Be brief."}
    assert to_trl(conversation, "sft") == {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
        ]
    }
    prompt = {"conversations": [{"from": "human", "value": "2+2?"}]}
    assert to_trl(prompt, "prompts") == {"prompt": [{"role": "user", "content": "2+2?"}]}


def test_hh_pair_splits_at_the_last_assistant_turn():
    assert detect(HH_PAIR) == "hh"
    assert to_trl(HH_PAIR, "pairs") == {
        "prompt": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "2+2?"},
        ],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
    }


def test_alpaca_rows_for_sft_pairs_and_prompts():
    assert detect(ALPACA_SFT) == "alpaca"
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add the numbers.\n\n2 and 2"}]
    assert to_trl(ALPACA_SFT, "sft") == {"messages": [*prompt, {"role": "assistant", "content": "4"}]}
    pair = {"instruction": "Add the numbers.", "input": "", "chosen": "4", "rejected": "5"}
    assert to_trl(pair, "pairs")["prompt"] == [{"role": "user", "content": "Add the numbers."}]
    assert to_trl({"instruction": "Say hi."}, "prompts") == {"prompt": [{"role": "user", "content": "Say hi."}]}


def test_trl_rows_pass_through_and_an_explicit_format_is_forced():
    trl = {"prompt": "2+2?", "chosen": " 4", "rejected": " 5"}
    assert to_trl(trl, "pairs") is trl
    with pytest.raises(FormatProblem, match="'conversations' must be a non-empty list"):
        to_trl(trl, "pairs", "sharegpt")


@pytest.mark.parametrize(
    ("row", "kind", "reason"),
    [
        ({"conversations": [{"from": "bot", "value": "x"}]}, "pairs", "'conversations[0].from' is 'bot'"),
        ({"conversations": [{"from": "human"}]}, "pairs", "'conversations[0]' must be an object with 'from'"),
        ({**SHAREGPT_PAIR, "conversations": SHAREGPT_PAIR["conversations"][:3]}, "pairs", "must end with a human turn"),
        ({"conversations": SHAREGPT_PAIR["conversations"]}, "sft", "must end with a gpt turn"),
        ({**SHAREGPT_PAIR, "chosen": {"from": "human", "value": "4"}}, "pairs", "'chosen.from' must be a gpt"),
        ({**SHAREGPT_PAIR, "rejected": {"from": "gpt", "value": ""}}, "pairs", "'rejected[0].content' is empty"),
        ({**SHAREGPT_PAIR, "rejected": SHAREGPT_PAIR["chosen"]}, "pairs", "'chosen' is identical to 'rejected'"),
        ({**HH_PAIR, "rejected": "\n\nHuman: Bye\n\nAssistant: 5"}, "pairs", "do not share the dialogue"),
        ({"chosen": "\n\nHuman: Hi", "rejected": "\n\nHuman: Hi"}, "pairs", "must end with an Assistant turn"),
        ({"chosen": "Hi\n\nHuman: x\n\nAssistant: 4", "rejected": "\n\nHuman: x\n\nAssistant: 5"}, "pairs", "is not a"),
        ({"instruction": 3, "output": "4"}, "sft", "'instruction' must be a string"),
        ({"instruction": "Add.", "output": None}, "sft", "'output' must be a string"),
    ],
)
def test_each_bad_row_kind_is_named_with_its_line(tmp_path, row, kind, reason):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    result = read_records(path, kind)
    assert not result.rows
    assert len(result.bad) == 1 and result.bad[0][0] == 1 and reason in result.bad[0][1], result.bad


def write_sources(rows: list[dict], folder: Path) -> dict[str, Path]:
    """The same rows as a JSON-lines file, a JSON list, a parquet file and a save_to_disk folder."""
    from datasets import Dataset

    folder.mkdir(parents=True, exist_ok=True)
    paths = {"jsonl": folder / "rows.jsonl", "json": folder / "rows.json", "parquet": folder / "rows.parquet"}
    paths["jsonl"].write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    paths["json"].write_text(json.dumps(rows, indent=1), encoding="utf-8")
    Dataset.from_list(rows).to_parquet(str(paths["parquet"]))
    Dataset.from_list(rows).save_to_disk(str(folder / "saved"))
    paths["saved"] = folder / "saved"
    return paths


def test_every_source_kind_reads_the_same_rows(tmp_path):
    rows = [{**ALPACA_SFT, "output": str(n)} for n in range(5)]
    expected = [to_trl(row, "sft") for row in rows]
    for kind, path in write_sources(rows, tmp_path).items():
        result = read_records(path, "sft")
        assert result.rows == expected, kind
        assert result.unit == ("line" if kind == "jsonl" else "row")


def test_a_bad_row_of_a_row_source_is_named_by_its_position(tmp_path):
    rows = [ALPACA_SFT, {**ALPACA_SFT, "output": ""}]
    paths = write_sources(rows, tmp_path)
    result = read_records(paths["parquet"], "sft")
    assert [f"{result.where(n)}: {reason}" for n, reason in result.bad] == [
        f"{paths['parquet']} row 2: 'messages[2].content' is empty"
    ]
    broken = tmp_path / "broken.json"
    broken.write_text('[\n {"instruction": "x",\n  oops}\n]', encoding="utf-8")
    with pytest.raises(DataError, match=f"{broken}:3: not valid JSON"):
        read_records(broken, "sft")
    with pytest.raises(DataError, match="no such file or folder"):
        read_records(tmp_path / "missing.parquet", "sft")


def test_sample_is_seeded_ordered_and_bounded():
    rows = list(range(100))
    half = sample(rows, 0.5, None, seed=1)
    assert len(half) == 50 and half == sorted(half) and half == sample(rows, 0.5, None, seed=1)
    assert half != sample(rows, 0.5, None, seed=2)
    assert len(sample(rows, 0.5, 10, seed=1)) == 10 and sample(rows, 1.0, None, seed=1) == rows


def test_prepare_reads_alpaca_sft_and_sharegpt_pairs_and_samples_them(tmp_path):
    from tasks.base import build_base

    params = load_params(
        ROOT / "params.yaml",
        # Not the built-in task's questions: a judge other than the default `rule` (which would refuse them).
        {"data.sample_fraction": 0.5, "data.max_rows": 6, "onpolicy.judge.kind": "reward_model",
         "onpolicy.judge.reward_model": "a-reward-model"},
    )  # fmt: skip
    base = tmp_path / "base"
    build_base(params, ROOT / "data/builtin/sft.jsonl", base)
    sft = write_sources([{**ALPACA_SFT, "output": f"answer {n}"} for n in range(20)], tmp_path / "sft")["parquet"]
    pairs = [{**SHAREGPT_PAIR, "chosen": {"from": "gpt", "value": f"answer {n}"}} for n in range(10)]
    eval_pairs = write_sources(pairs, tmp_path / "pairs")["json"]
    outputs = [tmp_path / name for name in ("train.jsonl", "heldout.jsonl", "eval.jsonl", "report.json")]
    summary = prepare(params, sft, eval_pairs, base, *outputs)
    assert summary["sft"]["kept"] == 20 and summary["sft"]["sampled"] == 6
    assert summary["sft"]["train"] + summary["sft"]["heldout"] == 6
    assert summary["eval_pairs"]["kept"] == 10 and summary["eval_pairs"]["sampled"] == 5
    first = json.loads(outputs[2].read_text().splitlines()[0])
    assert first["prompt"][0] == {"role": "system", "content": "Be brief."}


@pytest.mark.skipif(not LLAMAFACTORY.is_dir(), reason=f"no real artifacts at {REAL} (set SFT_DPO_REAL_ARTIFACTS)")
@pytest.mark.parametrize(
    ("name", "kind", "rows"),
    [("dpo_en_demo.json", "pairs", 300), ("dpo_zh_demo.json", "pairs", 300), ("alpaca_en_demo.json", "sft", 999)],
)
def test_llamafactory_demo_files_convert_without_a_bad_row(name, kind, rows):
    result = read_records(LLAMAFACTORY / name, kind)
    assert result.bad == [] and result.lines == rows
    assert len(result.rows) + result.duplicates == rows
    row = result.rows[0]
    if kind == "pairs":
        assert row["prompt"][-1]["role"] == "user" and row["chosen"][0]["role"] == "assistant"
    else:
        assert row["messages"][-1]["role"] == "assistant"


def test_a_conversation_the_chat_template_refuses_is_a_bad_row_with_its_message(tmp_path):
    from tasks.base import build_base

    params = load_params(ROOT / "params.yaml")
    base = tmp_path / "base"
    build_base(params, ROOT / "data/builtin/sft.jsonl", base)
    template = base / "chat_template.jinja"
    # Like some instruct templates: no system role, and the template says so itself.
    refusal = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    template.write_text(refusal + template.read_text())
    rows = [
        {"conversations": SHAREGPT_PAIR["conversations"][1:3]},
        {"conversations": SHAREGPT_PAIR["conversations"][:3]},
    ]
    sft = write_sources(rows, tmp_path / "sft")["jsonl"]
    outputs = [tmp_path / name for name in ("train.jsonl", "heldout.jsonl", "eval.jsonl", "report.json")]
    with pytest.raises(DataError, match=f"{sft}:2: the chat template refused this conversation: System role not"):
        prepare(params, sft, ROOT / "data/builtin/eval_pairs.jsonl", base, *outputs)
    assert not any(path.exists() for path in outputs)
