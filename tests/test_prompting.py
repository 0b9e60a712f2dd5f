"""The prompt travels with the adapter: `lorafleet_prompt.json` is validated, and a request is turned into the
prompt the adapter was trained on (chat with its system prompt, raw completion with its prefix, LoRAX inputs put
through the chat template), each switchable. Pure logic on the tiny test tokenizer; run `pytest tests/test_prompting.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapters.prompt_format import PROMPT_FILE, PromptFormat, PromptFormatError, read_prompt_format
from adapters.sources.local_catalog import LocalCatalog
from serve_app.prompting import effective_messages, prompt_ids

CHAT = PromptFormat(mode="chat", system_prompt="Answer with one word.", format="input_output")
RAW = PromptFormat(mode="completion", prompt_prefix="Classify the ticket.\n\n", format="prompt_completion")
USER = [{"role": "user", "content": "the app crashes"}]


def test_prompt_file_round_trips_and_a_broken_one_is_refused_with_a_reason(tmp_path: Path) -> None:
    CHAT.write(tmp_path)
    assert read_prompt_format(tmp_path) == CHAT
    assert read_prompt_format(tmp_path / "nothing-here") is None
    (tmp_path / PROMPT_FILE).write_text(json.dumps({"mode": "chat", "system": "x"}))
    with pytest.raises(PromptFormatError, match="system: Extra inputs are not permitted"):
        read_prompt_format(tmp_path)
    (tmp_path / PROMPT_FILE).write_text("{not json")
    with pytest.raises(PromptFormatError, match="is not valid"):
        read_prompt_format(tmp_path)
    (tmp_path / PROMPT_FILE).write_bytes(b'{"mode": "chat", "system_prompt": "\xff"}')
    with pytest.raises(PromptFormatError):
        read_prompt_format(tmp_path)


def test_chat_requests_get_the_trained_system_prompt_unless_they_bring_one() -> None:
    assert effective_messages(USER, CHAT, True) == [{"role": "system", "content": CHAT.system_prompt}, *USER]
    own = [{"role": "system", "content": "mine"}, *USER]
    assert effective_messages(own, CHAT, True) == own  # the client's system message wins
    assert effective_messages(USER, CHAT, False) == USER  # serve option apply_trained_prompt: false
    assert effective_messages(USER, None, True) == USER  # an adapter trained elsewhere / the base
    assert effective_messages(USER, RAW, True) == USER


def test_prompt_ids_follow_the_adapters_training_format(tiny_base) -> None:
    tok = tiny_base.tokenizer

    def chat(messages: list[dict]) -> list[int]:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tok(text, add_special_tokens=False).input_ids

    with_system = [{"role": "system", "content": CHAT.system_prompt}, *USER]
    assert prompt_ids(tok, {"kind": "chat", "messages": USER}, CHAT) == chat(with_system)
    assert prompt_ids(tok, {"kind": "chat", "messages": USER}, CHAT, apply_trained=False) == chat(USER)
    lorax = {"kind": "text", "api": "lorax", "prompt": "the app crashes"}
    assert prompt_ids(tok, lorax, CHAT) == chat(with_system)  # LoRAX raw inputs, templated as trained
    assert prompt_ids(tok, lorax, CHAT, template_lorax_chat=False) == tok("the app crashes").input_ids
    openai_text = {"kind": "text", "prompt": "the app crashes"}
    assert prompt_ids(tok, openai_text, CHAT) == tok("the app crashes").input_ids  # /v1/completions stays raw
    assert prompt_ids(tok, openai_text, RAW) == tok(RAW.prompt_prefix + "the app crashes").input_ids
    assert prompt_ids(tok, openai_text, RAW, apply_trained=False) == tok("the app crashes").input_ids
    assert prompt_ids(tok, openai_text, None) == tok("the app crashes").input_ids


def test_local_catalog_keeps_the_prompt_file_and_refuses_a_broken_one(tmp_path: Path, tiny_shapes) -> None:
    from adapters.lora_files import AdapterRejected
    from adapters.random_adapter import write_random_adapter

    src = write_random_adapter(tmp_path / "src", tiny_shapes, rank=4, seed=0)
    CHAT.write(src)
    catalog = LocalCatalog(tmp_path / "catalog")
    ref = catalog.add("triage", src)
    assert read_prompt_format(catalog.fetch(ref)) == CHAT
    (src / PROMPT_FILE).write_text('{"mode": "poem"}')
    with pytest.raises(AdapterRejected, match=PROMPT_FILE):
        catalog.add("broken", src)
