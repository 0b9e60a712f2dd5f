"""Request -> prompt token ids, asked the way the adapter was trained (its `lorafleet_prompt.json`).

- A chat request without a system message gets the adapter's trained system prompt (serve option
  `apply_trained_prompt: false` turns that off); a system message the client sends always wins.
- A raw-completion adapter (trained on prompt/completion or text rows) gets its trained prefix (the instruction).
- A LoRAX `/generate` call (raw `inputs`) to an adapter trained on chat data is put through the chat template as a
  user turn, with the trained system prompt, as in training (`template_lorax_chat: false` sends it raw).
- OpenAI `/v1/completions` prompts stay raw text for chat adapters: that endpoint promises no template.
Adapters without a prompt file (trained elsewhere) and the bare base get exactly what the client sent.

The training side renders eval prompts with `jobs.data.eval_prompt_ids`, which matches this for every format
(tests/test_prompting.py checks the two agree token for token).
"""

from __future__ import annotations

from typing import Any

from adapters.prompt_format import PromptFormat


def effective_messages(messages: list[dict[str, Any]], fmt: PromptFormat | None, apply_trained: bool) -> list[dict]:
    """The chat messages the model sees: the client's, with the trained system prompt first when it sent none."""
    if not (apply_trained and fmt and fmt.mode == "chat" and fmt.system_prompt):
        return messages
    if any(m.get("role") == "system" for m in messages):
        return messages
    return [{"role": "system", "content": fmt.system_prompt}, *messages]


def prompt_ids(tokenizer: Any, payload: dict[str, Any], fmt: PromptFormat | None, apply_trained: bool = True,
               template_lorax_chat: bool = True) -> list[int]:  # fmt: skip
    """Token ids for a request payload (`kind` chat or text; `api: lorax` marks LoRAX's raw inputs)."""
    if payload["kind"] == "chat":
        return chat_ids(tokenizer, effective_messages(payload["messages"], fmt, apply_trained))
    text = payload["prompt"]
    if fmt is not None and payload.get("api") == "lorax" and fmt.mode == "chat" and template_lorax_chat:
        return chat_ids(tokenizer, effective_messages([{"role": "user", "content": text}], fmt, apply_trained))
    if fmt is not None and fmt.mode == "completion" and fmt.prompt_prefix and apply_trained:
        text = fmt.prompt_prefix + text
    return tokenizer(text, add_special_tokens=True).input_ids


def chat_ids(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids
