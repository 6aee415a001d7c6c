"""Real preference files as people have them (tasks/lib/records.py, tasks/prepare.py, tasks/prompts.py,
tasks/pairs.py, tasks/base.py): extra columns, an implicit prompt, pairs longer than the model's window, human
pairs in the other TRL format. Each test writes a file in the shape the public datasets have."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.base import build_base
from tasks.lib.chat import split_ids
from tasks.lib.errors import DataError
from tasks.lib.params import load_params
from tasks.lib.policies import load_base_tokenizer
from tasks.lib.records import read_records
from tasks.pairs import build_pairs
from tasks.prepare import prepare
from tasks.prompts import draw_prompts

ROOT = Path(__file__).resolve().parents[1]
POOL = ROOT / "data/builtin/prompts.jsonl"  # conversational, as the built-in rounds are
SKY = [{"role": "user", "content": "What color is the sky?"}]
BLUE, GREEN = [{"role": "assistant", "content": "It is blue."}], [{"role": "assistant", "content": "It is green."}]
ULTRAFEEDBACK_H4 = {  # HuggingFaceH4/ultrafeedback_binarized: a string prompt beside whole conversations
    "prompt": "What color is the sky?",
    "prompt_id": "8d1c",
    "chosen": SKY + BLUE,
    "rejected": SKY + GREEN,
    "messages": SKY + BLUE,
    "score_chosen": 8.0,
    "score_rejected": 3.5,
}
ULTRAFEEDBACK_TRL = {"chosen": SKY + BLUE, "rejected": SKY + GREEN, "score_chosen": 8.0, "score_rejected": 3.5}
WITH_METADATA = {
    "id": 7,
    "source": "ours",
    "metadata": {"annotator": 3},
    "prompt": SKY,
    "chosen": BLUE,
    "rejected": GREEN,
}
EXPECTED = {"prompt": SKY, "chosen": BLUE, "rejected": GREEN}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("base") / "base"
    build_base(load_params(ROOT / "params.yaml", OWN_DATA), ROOT / "data/builtin/sft.jsonl", out)
    return out


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def prepare_outputs(tmp_path: Path) -> list[Path]:
    return [tmp_path / name for name in ("train.jsonl", "heldout.jsonl", "pairs.jsonl", "report.json")]


OWN_DATA = {"onpolicy.judge.kind": "reward_model", "onpolicy.judge.reward_model": "a-reward-model"}
"""Params for data that is not the built-in task's: the default `rule` judge refuses such prompts at prepare."""


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("row", [ULTRAFEEDBACK_H4, ULTRAFEEDBACK_TRL, WITH_METADATA], ids=["h4", "trl-lib", "ids"])
def test_extra_columns_are_set_aside_and_an_implicit_prompt_is_read_as_trl_reads_it(tmp_path, base, row):
    red = [{"role": "assistant", "content": "It is red."}]
    other = {**row, "rejected": red if isinstance(row.get("prompt"), list) else SKY + red}
    pairs = write_rows(tmp_path / "eval.jsonl", [row, other])
    summary = prepare(load_params(ROOT / "params.yaml", OWN_DATA), ROOT / "data/builtin/sft.jsonl", pairs, base,
                      *prepare_outputs(tmp_path))  # fmt: skip
    written = read_jsonl(tmp_path / "pairs.jsonl")
    assert written == [EXPECTED, {**EXPECTED, "rejected": red}]
    extra = sorted(set(row) - {"prompt", "chosen", "rejected"})
    assert summary["eval_pairs"]["extra_fields_set_aside"] == dict.fromkeys(extra, 2)
    assert summary["eval_pairs"]["kept"] == 2 and summary["eval_pairs"]["dropped"] == 0


def test_refusing_extra_columns_is_a_setting_and_names_the_line(tmp_path):
    pairs = write_rows(tmp_path / "eval.jsonl", [EXPECTED, WITH_METADATA])
    result = read_records(pairs, "pairs", extra_fields="refuse")
    assert result.bad == [(2, "unknown field(s) id, metadata, source (data.extra_fields: refuse)")]
    assert read_records(pairs, "pairs").bad == []


def test_sft_conversations_with_ids_train_on_their_messages_only(tmp_path):
    row = {"id": "a1", "messages": SKY + BLUE, "source": "web"}
    result = read_records(write_rows(tmp_path / "sft.jsonl", [row]), "sft")
    assert result.rows == [{"messages": SKY + BLUE}] and result.extra_fields == {"id": 1, "source": 1}


def test_an_implicit_prompt_with_no_shared_turn_is_a_bad_line(tmp_path):
    row = {"chosen": SKY + BLUE, "rejected": [{"role": "user", "content": "Other?"}, *GREEN]}
    result = read_records(write_rows(tmp_path / "eval.jsonl", [EXPECTED, row]), "pairs")
    assert result.bad == [(2, "'chosen' and 'rejected' hold no 'prompt' and share no first turn to take it from")]


def test_eval_pairs_longer_than_the_model_window_are_cut_to_what_every_evaluator_can_read(tmp_path, base):
    """Real multi-turn Chinese pairs run past the built-in model's 256 positions; lm-eval asserts a continuation
    fits its window. prepare cuts each response (keep_start, as DPO trains) and the written pair fits."""
    long_answer = [{"role": "assistant", "content": "长的回答，" * 300}]
    pairs = write_rows(tmp_path / "eval.jsonl", [EXPECTED, {"prompt": SKY, "chosen": long_answer, "rejected": GREEN}])
    params = load_params(ROOT / "params.yaml", OWN_DATA)
    summary = prepare(params, ROOT / "data/builtin/sft.jsonl", pairs, base, *prepare_outputs(tmp_path))
    tokenizer = load_base_tokenizer(base, params.model)
    written = read_jsonl(tmp_path / "pairs.jsonl")
    assert written[0] == EXPECTED and written[1]["rejected"] == GREEN
    cut = split_ids(tokenizer, SKY, written[1]["chosen"])
    assert len(cut.prompt_ids) + len(cut.response_ids) <= params.dpo.sequence.max_length
    assert written[1]["chosen"][0]["content"].startswith("长的回答，长的回答")
    assert summary["eval_pairs"]["cut_to_fit"] == 1 and summary["eval_pairs"]["tokens_max"] <= 128


def test_a_prompt_that_alone_fills_the_window_is_a_bad_line_naming_the_key(tmp_path, base):
    long_prompt = [{"role": "user", "content": "问题" * 400}]
    pairs = write_rows(tmp_path / "eval.jsonl", [EXPECTED, {"prompt": long_prompt, "chosen": BLUE, "rejected": GREEN}])
    outputs = prepare_outputs(tmp_path)
    with pytest.raises(DataError, match=rf"{pairs}:2: the prompt alone is \d+ tokens: no room for a response within "
                       r"dpo.sequence.max_length=128"):  # fmt: skip
        prepare(load_params(ROOT / "params.yaml", OWN_DATA), ROOT / "data/builtin/sft.jsonl", pairs, base, *outputs)
    assert not any(path.exists() for path in outputs)


def test_string_human_pairs_join_a_conversational_round_as_messages(tmp_path):
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    write_rows(incoming / "r1.jsonl", [{"prompt": "What is 2 plus 2?", "chosen": "4.", "rejected": "5.", "id": 1}])
    outputs = [tmp_path / "prompts.jsonl", tmp_path / "human.jsonl", tmp_path / "report.json"]
    summary = draw_prompts(load_params(ROOT / "params.yaml", OWN_DATA), "r1", POOL, incoming, *outputs)
    assert read_jsonl(tmp_path / "human.jsonl") == [
        {
            "prompt": [{"role": "user", "content": "What is 2 plus 2?"}],
            "chosen": [{"role": "assistant", "content": "4."}],
            "rejected": [{"role": "assistant", "content": "5."}],
        }
    ]
    assert summary["incoming"]["converted_to_round_format"] == 1 and summary["incoming_pairs"] == 1


def test_conversational_human_pairs_for_a_string_round_are_refused_before_sampling(tmp_path):
    pool = write_rows(tmp_path / "pool.jsonl", [{"prompt": f"{i} plus {i}?"} for i in range(4)])
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    user_file = write_rows(incoming / "r1.jsonl", [EXPECTED])
    outputs = [tmp_path / "prompts.jsonl", tmp_path / "human.jsonl", tmp_path / "report.json"]
    with pytest.raises(DataError, match=rf"{user_file}:1: a conversational pair"):
        draw_prompts(load_params(ROOT / "params.yaml", OWN_DATA), "r1", pool, incoming, *outputs)
    assert not any(path.exists() for path in outputs)


def test_no_source_of_pairs_is_dropped_whole(tmp_path, base):
    """Were human pairs in the other format to reach the pairs stage, dropping a minority format would drop a whole
    source; the stage fails instead, even with `data.on_bad_lines: drop`."""
    scored = write_rows(tmp_path / "scored.jsonl", [
        {"prompt": [{"role": "user", "content": f"{i}?"}], "responses": ["Yes.", "No."], "scores": [1.0, 0.0]}
        for i in range(3)
    ])  # fmt: skip
    human = write_rows(
        tmp_path / "human.jsonl", [{"prompt": f"{i}?", "chosen": " a", "rejected": " b"} for i in range(5)]
    )
    params = load_params(ROOT / "params.yaml", {"data.on_bad_lines": "drop", "data.max_bad_fraction": 0.9})
    with pytest.raises(DataError, match=r"all 3 on-policy pairs \(judged responses\) were refused"):
        build_pairs(params, scored, human, base, base, tmp_path / "pairs.jsonl", tmp_path / "report.json")
    assert not (tmp_path / "pairs.jsonl").exists()


def test_an_sft_file_with_no_usable_row_is_refused_before_the_base_is_built(tmp_path):
    sft = write_rows(tmp_path / "sft.jsonl", [{"messages": SKY}])
    out = tmp_path / "base"
    with pytest.raises(DataError, match=rf"{sft} \(data.sft\): no usable SFT rows in 1 lines\n{sft}:1: 'messages' has"):
        build_base(load_params(ROOT / "params.yaml", OWN_DATA), sft, out)
    assert not out.exists()


def test_the_rule_judge_refuses_held_out_prompts_it_cannot_score_at_prepare_naming_the_line(tmp_path, base):
    builtin = {**EXPECTED, "prompt": [{"role": "user", "content": "What is 2 plus 3?"}]}
    pairs = write_rows(tmp_path / "eval.jsonl", [builtin, EXPECTED])
    outputs = prepare_outputs(tmp_path)
    with pytest.raises(DataError, match=rf"{pairs}:2: 'What color is the sky\?' is not a built-in task question, and "
                       r"onpolicy.judge.kind: rule scores only data/generate.py's questions"):  # fmt: skip
        prepare(load_params(ROOT / "params.yaml"), ROOT / "data/builtin/sft.jsonl", pairs, base, *outputs)
    assert not any(path.exists() for path in outputs)
