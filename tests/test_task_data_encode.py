"""Encoding Examples to token ids and labels (jobs/data.py): the exact label mask of every format against the tokenizer's
own rendering, overlength policies, templates that rewrite turns, and that eval prompts equal what the server builds.

Uses the tiny byte-level tokenizer (one token per byte, ChatML template); one test uses SmolLM2's real tokenizer.

    .venv/bin/python -m pytest -q tests/test_task_data_encode.py
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from chat_messages import assistant, system, user

from adapters.tiny_llama import build_byte_tokenizer
from jobs.data import IGNORE, encode_example, encode_examples, eval_prompt_ids, render_example
from jobs.task_data import DatasetError, Example
from jobs.task_data.render import format_runs, marked_runs
from serve_app.app_config import ServeAppConfig
from serve_app.model_service import ModelService


def chat(*messages: dict, loss_turns: str = "assistant", where: str = "t.jsonl:1") -> Example:
    answer = messages[-1]["content"]
    return Example(id=where, where=where, mode="chat", messages=messages, completion=answer, reference=answer,
                   loss_turns=loss_turns)  # type: ignore[arg-type]  # fmt: skip


def completion(prompt: str, answer: str, where: str = "t.jsonl:1") -> Example:
    return Example(id=where, where=where, mode="completion", prompt=prompt, completion=answer, reference=answer)


@pytest.fixture(scope="module")
def tok() -> Any:
    return build_byte_tokenizer()


def marked(tok: Any, example: Example, max_len: int = 4096, overlength: str = "truncate") -> str:
    encoded = encode_example(tok, example, max_len, overlength)
    assert encoded is not None
    return format_runs(marked_runs(tok, encoded))


def server_ids(tok: Any, payload: dict) -> list[int]:
    """What the server's ModelService.encode builds for a request to the base model (the method reads only the
    tokenizer, the default serve config and the adapters' prompt formats, so no engine is built)."""
    service = SimpleNamespace(tokenizer=tok, config=ServeAppConfig(), _prompts={})
    return ModelService.encode(service, payload)  # type: ignore[arg-type]


def test_single_turn_chat_trains_the_answer_and_end_of_turn(tok: Any) -> None:
    example = chat(system("Add."), user("2+2"), assistant("4"))
    assert marked(tok, example) == (
        "<|im_start|>system\nAdd.<|im_end|>\n<|im_start|>user\n2+2<|im_end|>\n<|im_start|>assistant\n⟦4<|im_end|>\n⟧"
    )
    encoded = encode_example(tok, example, 4096)
    full = tok.apply_chat_template(list(example.messages), tokenize=False)
    assert encoded is not None and encoded.input_ids == tok(full, add_special_tokens=False).input_ids
    prompt = eval_prompt_ids(tok, example)
    assert encoded.input_ids[: len(prompt)] == prompt and set(encoded.labels[: len(prompt)]) == {IGNORE}
    assert encoded.labels[len(prompt) :] == encoded.input_ids[len(prompt) :]


def test_multi_turn_messages_train_every_assistant_turn_only(tok: Any) -> None:
    example = chat(user("Hi"), assistant("Hello!"), user("2+2?"), assistant("4"))
    assert marked(tok, example) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n⟦Hello!<|im_end|>\n⟧"
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n⟦4<|im_end|>\n⟧"
    )
    encoded = encode_example(tok, example, 4096)
    assert encoded is not None
    trained = [t for t, label in zip(encoded.input_ids, encoded.labels, strict=True) if label != IGNORE]
    assert tok.decode(trained) == "Hello!<|im_end|>\n4<|im_end|>\n"
    # the prompt of the last turn is exactly the server's prompt for the conversation so far
    prompt = server_ids(tok, {"kind": "chat", "messages": example.prompt_messages()})
    assert encoded.input_ids[: len(prompt)] == prompt == eval_prompt_ids(tok, example)


def test_conversational_prompt_completion_trains_the_last_turn_only(tok: Any) -> None:
    example = chat(user("1+1"), assistant("2"), user("2+2"), assistant("4"), loss_turns="last")
    assert marked(tok, example) == (
        "<|im_start|>user\n1+1<|im_end|>\n<|im_start|>assistant\n2<|im_end|>\n"
        "<|im_start|>user\n2+2<|im_end|>\n<|im_start|>assistant\n⟦4<|im_end|>\n⟧"
    )


def test_completion_mode_is_raw_text_with_eos(tok: Any) -> None:
    example = completion("Q: 2+2\nA:", " 4")
    assert marked(tok, example) == "Q: 2+2\nA:⟦ 4<|im_end|>⟧"
    encoded = encode_example(tok, example, 4096)
    assert encoded is not None and encoded.input_ids[-1] == tok.eos_token_id
    prompt = server_ids(tok, {"kind": "text", "prompt": example.prompt})
    assert prompt == eval_prompt_ids(tok, example) == encoded.input_ids[: len(prompt)]


def test_text_format_trains_on_everything(tok: Any) -> None:
    example = Example(id="x", where="t.jsonl:1", mode="completion", prompt="", completion="once upon a time")
    assert marked(tok, example) == "⟦once upon a time<|im_end|>⟧"


def test_eval_prompt_ids_equal_the_servers_chat_encoding(tok: Any) -> None:
    for example in (chat(system("Be brief."), user("name a colour"), assistant("red")),
                    chat(user("a"), assistant("b"), user("c"), assistant("d"))):  # fmt: skip
        payload = {"kind": "chat", "messages": example.prompt_messages()}
        assert eval_prompt_ids(tok, example) == server_ids(tok, payload)


def test_overlength_truncate_drop_error(tok: Any) -> None:
    short = completion("ab", "cd", where="t.jsonl:1")  # 2 + 2 + eos = 5 tokens
    long = completion("ab", "cdefgh", where="t.jsonl:2")  # 9 tokens
    huge = completion("abcdefghij", "k", where="t.jsonl:3")  # the prompt alone is over the limit
    cut = encode_example(tok, long, 6, "truncate")
    assert cut is not None and len(cut.input_ids) == 6 and tok.decode(cut.input_ids) == "abcdef"
    assert cut.labels[:2] == [IGNORE, IGNORE] and cut.labels[2:] == cut.input_ids[2:]
    assert encode_example(tok, long, 6, "drop") is None
    assert encode_example(tok, huge, 6, "truncate") is None  # nothing left to learn
    with pytest.raises(DatasetError, match=r"t.jsonl:2: 9 tokens, longer than max_seq_len=6 \(overlength: error\)"):
        encode_example(tok, long, 6, "error")
    kept, stats = encode_examples(tok, [short, long, huge], 6, "truncate")
    assert len(kept) == 2 and (stats.rows, stats.truncated, stats.dropped, stats.longest) == (3, 1, 1, 12)
    kept, stats = encode_examples(tok, [short, long, huge], 6, "drop")
    assert len(kept) == 1 and (stats.truncated, stats.dropped, stats.kept) == (0, 2, 1)
    assert stats.over == ["t.jsonl:2 (9 tokens)", "t.jsonl:3 (12 tokens)"]
    with pytest.raises(
        DatasetError, match=r"2 of 3 rows are longer than max_seq_len=6 .*t.jsonl:2 \(9 tokens\), t.jsonl:3"
    ):
        encode_examples(tok, [short, long, huge], 6, "error")
    with pytest.raises(DatasetError, match="no example fits max_seq_len=3"):
        encode_examples(tok, [huge], 3, "truncate")


def test_a_template_that_rewrites_earlier_turns_falls_back_to_the_last_answer() -> None:
    tok = build_byte_tokenizer()
    tok.chat_template = (  # earlier answers are shown abbreviated once a later turn exists
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}[answered]\n"
        "{% else %}{{ m['role'] + ': ' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    example = chat(user("Hi"), assistant("Hello!"), user("2+2?"), assistant("4"))
    full, fallback = render_example(tok, example)
    assert fallback
    assert (
        format_runs(marked_runs(tok, full))
        == "user: Hi<|im_end|>\n[answered]\nuser: 2+2?<|im_end|>\nassistant: ⟦4<|im_end|>\n⟧"
    )
    _, stats = encode_examples(tok, [example], 4096)
    assert stats.template_fallbacks == 1


def test_a_template_without_an_end_of_turn_token_gets_eos(tok: Any) -> None:
    plain = build_byte_tokenizer()
    plain.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    assert marked(plain, chat(user("2+2"), assistant("4"))) == "user: 2+2\nassistant: ⟦4\n<|im_end|>⟧"


def test_smollm2_tokenizer_multi_turn_mask_and_server_prompt() -> None:
    """The real base model's template (a default system prompt, ChatML) and BPE tokenizer."""
    from transformers import AutoTokenizer

    from adapters.smollm2 import smollm2_dir

    tok = AutoTokenizer.from_pretrained(smollm2_dir())
    example = chat(user("Hi"), assistant("Hello there!"), user("What is 2+2?"), assistant("It is 4."))
    encoded = encode_example(tok, example, 4096)
    assert encoded is not None
    full = tok.apply_chat_template(list(example.messages), tokenize=False)
    assert encoded.input_ids == tok(full, add_special_tokens=False).input_ids
    runs = marked_runs(tok, encoded)
    assert [text for text, trained in runs if trained] == ["Hello there!<|im_end|>\n", "It is 4.<|im_end|>\n"]
    assert "".join(text for text, _ in runs) == full
    prompt = server_ids(tok, {"kind": "chat", "messages": example.prompt_messages()})
    assert eval_prompt_ids(tok, example) == prompt == encoded.input_ids[: len(prompt)]
    raw = completion("Translate to French: cat\nFrench:", " chat")
    assert eval_prompt_ids(tok, raw) == server_ids(tok, {"kind": "text", "prompt": raw.prompt})
