"""tasks/base.py: the base folder every stage starts from, and `model.chat_template` replacing a tokenizer's own."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import CONVERSATION, real_artifact

from tasks.lib.errors import SettingError
from tasks.lib.params import ParamsError, load_params

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = "chat_templates/chatml_generation.jinja"


def test_a_template_outside_the_tracked_folder_is_refused_at_the_keys_own_line(tmp_path):
    with pytest.raises(ParamsError, match=r"model.chat_template: put the template in chat_templates/"):
        load_params(ROOT / "params.yaml", {"model.chat_template": "/tmp/my.jinja"})
    text = (ROOT / "params.yaml").read_text()
    assert "\n  chat_template: null" in text
    edited = tmp_path / "params.yaml"
    edited.write_text(text.replace("\n  chat_template: null", "\n  chat_template: /tmp/my.jinja", 1))
    line = next(n for n, row in enumerate(edited.read_text().splitlines(), 1) if "chat_template: /tmp" in row)
    with pytest.raises(ParamsError, match=rf"params.yaml:{line}: model.chat_template: put the template"):
        load_params(edited)


def test_a_template_that_does_not_parse_is_named_with_its_line(tmp_path, monkeypatch):
    from tasks.base import build_base

    monkeypatch.chdir(tmp_path)
    (tmp_path / "chat_templates").mkdir()
    (tmp_path / "chat_templates/broken.jinja").write_text("{% for m in messages %}\n{{ m['content'] }\n")
    params = load_params(ROOT / "params.yaml", {"model.chat_template": "chat_templates/broken.jinja"})
    with pytest.raises(SettingError, match=r"model.chat_template chat_templates/broken.jinja:2: not a valid Jinja"):
        build_base(params, ROOT / "data/builtin/sft.jsonl", tmp_path / "base")
    assert not (tmp_path / "base").exists()


def test_a_model_without_a_template_gets_the_replacement_in_every_stage(tmp_path, monkeypatch):
    """stories260K has no chat template: with one from chat_templates/, the base folder points at the model and
    carries the template, and the tokenizer the stages load renders conversations with generation markers."""
    from tasks.base import build_base
    from tasks.lib.chat import sft_loss_mask
    from tasks.lib.policies import load_base_tokenizer

    folder = real_artifact("models/stories260K")
    monkeypatch.chdir(ROOT)
    params = load_params(ROOT / "params.yaml", {"model.base": str(folder), "model.chat_template": TEMPLATE})
    build_base(params, ROOT / "data/builtin/sft.jsonl", tmp_path / "base")
    tokenizer = load_base_tokenizer(tmp_path / "base", params.model)
    assert tokenizer.chat_template == (ROOT / TEMPLATE).read_text()
    assert tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True).endswith(
        "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert sft_loss_mask(tokenizer, conversational=True) == "assistant_tokens"
    # Without the override the same base has no template, and conversational data is refused in prepare.
    plain = load_params(ROOT / "params.yaml", {"model.base": str(folder)})
    build_base(plain, ROOT / "data/builtin/sft.jsonl", tmp_path / "plain")
    assert load_base_tokenizer(tmp_path / "plain", plain.model).chat_template is None
