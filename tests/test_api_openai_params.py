"""OpenAI parameters honoured or refused, through the official `openai` client against the in-process app (tiny
model, real engine): logprobs (chat and completions, streamed too) equal a plain forward pass of the model;
n, seed, top_k, penalties and logit_bias change the output exactly as a reference decode loop says; stop cuts;
JSON output (json_object / json_schema) parses and validates, mixed in one batch with free rows and adapters;
everything not supported is a 400 naming the field."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from api_harness import build, client, write_catalog

from serve_app import prompting

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def app(tiny_base: Any, tiny_shapes: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    catalog = write_catalog(tmp_path_factory.mktemp("catalog"), tiny_shapes)
    with build(tiny_base, Path(catalog), engine={"max_seq_len": 256, "max_loras": 2, "max_running": 16}) as (a, _):
        yield a


def _run(app: Any, calls: Callable[[Any], Any]) -> Any:
    from openai import AsyncOpenAI

    async def go():
        async with client(app) as http:
            return await calls(AsyncOpenAI(base_url="http://test/v1", api_key="unused", http_client=http))

    return asyncio.run(go())


def _reference(base: Any, ids: list[int], steps: int, adjust: Callable[[torch.Tensor, list[int]], torch.Tensor]
               | None = None) -> tuple[list[int], list[torch.Tensor]]:  # fmt: skip
    """Greedy decode with full forward passes: (chosen ids, raw log_softmax at each step)."""
    out: list[int] = []
    logps = []
    with torch.inference_mode():
        for _ in range(steps):
            logits = base.model(torch.tensor([ids + out])).logits[0, -1].float()
            logps.append(torch.log_softmax(logits, -1))
            out.append(int((adjust(logits.clone(), out) if adjust else logits).argmax()))
    return out, logps


def test_logprobs_match_a_reference_forward_pass(app: Any, tiny_base: Any) -> None:
    tok = tiny_base.tokenizer
    chat_ids = prompting.prompt_ids(tok, {"kind": "chat", "messages": HI}, None)
    text_ids = tok("hello", add_special_tokens=True).input_ids

    async def calls(c):
        chat = await c.chat.completions.create(
            model="tiny-llama",
            messages=HI,
            max_tokens=6,
            temperature=0,
            logprobs=True,
            top_logprobs=3,
            extra_body={"ignore_eos": True},
        )
        stream = await c.chat.completions.create(model="tiny-llama", messages=HI, max_tokens=6, temperature=0,
                                                 logprobs=True, top_logprobs=3, stream=True,
                                                 extra_body={"ignore_eos": True})  # fmt: skip
        chunks = [x async for x in stream]
        text = await c.completions.create(model="tiny-llama", prompt="hello", max_tokens=6, temperature=0,
                                          logprobs=2, echo=True, extra_body={"ignore_eos": True})  # fmt: skip
        return chat, chunks, text

    chat, chunks, text = _run(app, calls)
    ids, logps = _reference(tiny_base, chat_ids, 6)
    content = chat.choices[0].logprobs.content
    assert [c.token for c in content] == [tok.decode([i]) for i in ids]
    for entry, logp in zip(content, logps, strict=True):
        assert entry.logprob == pytest.approx(float(logp.max()), abs=1e-4)
        assert [t.token for t in entry.top_logprobs] == [tok.decode([i]) for i in logp.topk(3).indices.tolist()]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(logp.topk(3).values.tolist(), abs=1e-4)
    streamed = [e for x in chunks if x.choices and x.choices[0].logprobs for e in x.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]

    ids, logps = _reference(tiny_base, text_ids, 6)
    lp = text.choices[0].logprobs
    n = len(text_ids)
    assert text.choices[0].text.startswith("hello") and lp.token_logprobs[0] is None
    with torch.inference_mode():
        prompt_ref = torch.log_softmax(tiny_base.model(torch.tensor([text_ids])).logits[0].float(), -1)
    assert lp.token_logprobs[1:n] == pytest.approx([float(prompt_ref[i, text_ids[i + 1]]) for i in range(n - 1)],
                                                   abs=1e-4)  # fmt: skip
    assert lp.token_logprobs[n:] == pytest.approx([float(x.max()) for x in logps], abs=1e-4)
    assert lp.text_offset[:2] == [0, 1]


def test_n_seed_and_top_k(app: Any) -> None:
    async def calls(c):
        kw = {"model": "ad0", "messages": HI, "max_tokens": 8, "temperature": 1.5}
        one = await c.chat.completions.create(n=3, seed=11, **kw)
        two = await c.chat.completions.create(n=3, seed=11, **kw)
        greedy = await c.chat.completions.create(**{**kw, "temperature": 0})
        top1 = await c.chat.completions.create(seed=3, extra_body={"top_k": 1}, **kw)
        many = await c.completions.create(model="tiny-llama", prompt=["ab", "cd"], n=2, max_tokens=3, seed=1)
        stream = await c.chat.completions.create(n=3, seed=11, stream=True, **kw)
        chunks = [x async for x in stream]
        return one, two, greedy, top1, many, chunks

    one, two, greedy, top1, many, chunks = _run(app, calls)
    streamed = ["", "", ""]
    for chunk in chunks:
        streamed[chunk.choices[0].index] += chunk.choices[0].delta.content or ""
    assert streamed == [ch.message.content for ch in one.choices]  # n streamed: choices interleaved by index
    texts = [ch.message.content for ch in one.choices]
    assert [ch.index for ch in one.choices] == [0, 1, 2] and len(set(texts)) > 1
    assert texts == [ch.message.content for ch in two.choices]  # same seed, same texts
    assert top1.choices[0].message.content == greedy.choices[0].message.content  # top_k=1 is greedy
    assert [ch.index for ch in many.choices] == [0, 1, 2, 3] and many.usage.completion_tokens == 12


def test_penalties_and_logit_bias_follow_the_reference(app: Any, tiny_base: Any) -> None:
    tok = tiny_base.tokenizer
    ids = tok("abab", add_special_tokens=True).input_ids
    x_id = tok("x", add_special_tokens=False).input_ids[0]

    def openai_penalties(logits: torch.Tensor, out: list[int]) -> torch.Tensor:
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.shape[0]).float()
        return logits - 0.7 * counts - 1.5 * (counts > 0).float()

    def ctrl(logits: torch.Tensor, out: list[int]) -> torch.Tensor:
        seen = torch.tensor(sorted(set(ids + out)))
        logits[seen] = torch.where(logits[seen] > 0, logits[seen] / 1.8, logits[seen] * 1.8)
        return logits

    async def calls(c):
        kw = {"model": "tiny-llama", "prompt": "abab", "max_tokens": 10, "temperature": 0}
        plain = await c.completions.create(**kw, extra_body={"ignore_eos": True})
        pen = await c.completions.create(**kw, frequency_penalty=0.7, presence_penalty=1.5,
                                         extra_body={"ignore_eos": True})  # fmt: skip
        rep = await c.completions.create(**kw, extra_body={"ignore_eos": True, "repetition_penalty": 1.8})
        bias = await c.completions.create(**kw, logit_bias={str(x_id): 100}, extra_body={"ignore_eos": True})
        return plain, pen, rep, bias

    plain, pen, rep, bias = _run(app, calls)
    for answer, adjust in ((plain, None), (pen, openai_penalties), (rep, ctrl)):
        ref, _ = _reference(tiny_base, ids, 10, adjust)
        # (the engine holds back the bytes of a character that is not complete when the text ends)
        assert answer.choices[0].text == tok.decode(ref, skip_special_tokens=True).rstrip("\ufffd")
    assert pen.choices[0].text != plain.choices[0].text and rep.choices[0].text != plain.choices[0].text
    assert bias.choices[0].text == "x" * 10


def test_stop_cuts_the_text(app: Any) -> None:
    async def calls(c):
        kw = {"model": "tiny-llama", "prompt": "hello", "max_tokens": 12, "temperature": 0}
        full = await c.completions.create(**kw, extra_body={"ignore_eos": True})
        stop = full.choices[0].text[3:5]
        cut = await c.completions.create(**kw, stop=[stop], extra_body={"ignore_eos": True})
        return full, stop, cut

    full, stop, cut = _run(app, calls)
    assert cut.choices[0].text == full.choices[0].text[: full.choices[0].text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


SCHEMAS = [
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "kind": {"enum": ["a", "b"]}},
     "required": ["ok", "kind"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 2}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"],
     "additionalProperties": False},
]  # fmt: skip


def test_json_output_mixed_in_one_batch(app: Any, tiny_base: Any) -> None:
    tok = tiny_base.tokenizer
    models = ["ad0", "ad1", "tiny-llama"]

    async def calls(c):
        jobs = []
        for i, schema in enumerate(SCHEMAS * 2):
            fmt = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}}
            jobs.append(c.chat.completions.create(model=models[i % 3], messages=HI, max_tokens=60, response_format=fmt,
                                                  temperature=0.8 if i >= 3 else 0, seed=i))  # fmt: skip
        # a random model writes endless keys: a bias toward closing quotes and braces (the grammar still decides)
        close = {str(tok(ch, add_special_tokens=False).input_ids[0]): 6 for ch in '"}'}
        jobs += [c.chat.completions.create(model=m, messages=HI, max_tokens=60, temperature=0, logit_bias=close,
                                           response_format={"type": "json_object"}) for m in models]  # fmt: skip
        jobs += [c.chat.completions.create(model=m, messages=HI, max_tokens=20, temperature=0) for m in models]
        return await asyncio.gather(*jobs)

    answers = _run(app, calls)
    for answer, schema in zip(answers, SCHEMAS * 2, strict=False):
        assert answer.choices[0].finish_reason == "stop", answer
        jsonschema.validate(json.loads(answer.choices[0].message.content), schema)
    for answer in answers[6:9]:
        assert answer.choices[0].finish_reason == "stop", answer
        assert isinstance(json.loads(answer.choices[0].message.content), dict), answer
    free = [a.choices[0].message.content for a in answers[9:]]
    assert any(not text.startswith("{") for text in free)  # unconstrained rows in the same batch stay free


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"reasoning_effort": "low"}, "reasoning_effort"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"store": True}, "store"),
        ({"extra_body": {"guided_json": {}}}, "guided_json"),
        ({"top_logprobs": 2}, None),
        ({"n": 17}, "n"),
        ({"stream_options": {"include_usage": True}}, None),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
         "response_format"),
        ({"messages": [{"role": "user", "content": "hi", "name": "bob"}]}, "messages.0.name"),
        ({"logit_bias": {"99999": 5}}, "logit_bias"),
    ],
)  # fmt: skip
def test_unsupported_parameters_are_400_naming_them(app: Any, kwargs: dict[str, Any], param: str | None) -> None:
    from openai import BadRequestError

    async def calls(c):
        with pytest.raises(BadRequestError) as err:
            await c.chat.completions.create(**{"model": "ad0", "messages": HI, "max_tokens": 2, **kwargs})
        return err.value

    error = _run(app, calls).body
    key = param or next(k for k in kwargs if k not in ("extra_body",))
    assert error["param"] == param or key in error["message"], error
    assert key.split(".")[-1] in error["message"] or error["param"] == key, error


def test_completions_suffix_and_best_of_with_stream_are_refused(app: Any) -> None:
    from openai import BadRequestError

    async def calls(c):
        errors = []
        for kw in ({"suffix": "x"}, {"best_of": 2, "stream": True}):
            with pytest.raises(BadRequestError) as err:
                await c.completions.create(model="ad0", prompt="hi", max_tokens=2, **kw)
            errors.append(err.value.body)
        return errors

    suffix, best_of = _run(app, calls)
    assert suffix["param"] == "suffix" and "best_of" in best_of["message"]
