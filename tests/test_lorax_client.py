"""The real PyPI `lorax-client` (0.6.3) against the app served on a loopback port (tiny model, in-process engine):
sync and async clients, whole and streamed, base model and adapter, unknown adapter -> the client's NotFoundError.
`details` must carry the engine's real token ids and logprobs: checked against a plain forward pass of the model."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from api_harness import build, live, write_catalog


@pytest.fixture(scope="module")
def url(tiny_base: Any, tiny_shapes: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    catalog = write_catalog(tmp_path_factory.mktemp("catalog"), tiny_shapes)
    with build(tiny_base, Path(catalog)) as (app, _), live(app) as base_url:
        yield base_url


def _reference_logprobs(base: Any, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.log_softmax(base.model(torch.tensor([ids])).logits[0].float(), dim=-1)


def test_sync_generate_details_are_real_token_ids_and_logprobs(url: str, tiny_base: Any) -> None:
    from lorax import Client

    client = Client(url, timeout=120)
    answer = client.generate("hello", max_new_tokens=6, decoder_input_details=True, return_k_alternatives=3)
    details = answer.details
    prompt_ids = [t.id for t in details.prefill]
    out_ids = [t.id for t in details.tokens]
    assert prompt_ids == tiny_base.tokenizer("hello").input_ids and details.generated_tokens == len(out_ids)
    assert answer.generated_text == tiny_base.tokenizer.decode(out_ids, skip_special_tokens=True)
    ref = _reference_logprobs(tiny_base, prompt_ids + out_ids)
    n = len(prompt_ids)
    for i, tok in enumerate(details.tokens):  # greedy: each token is the argmax; its logprob the model's own
        assert tok.id == int(ref[n - 1 + i].argmax())
        assert tok.logprob == pytest.approx(float(ref[n - 1 + i, tok.id]), abs=1e-4)
        assert [a.id for a in tok.alternative_tokens] == ref[n - 1 + i].topk(3).indices.tolist()
    for i, tok in enumerate(details.prefill[1:], start=1):
        assert tok.logprob == pytest.approx(float(ref[i - 1, tok.id]), abs=1e-4)
    assert details.prefill[0].logprob is None


def test_sync_stream_matches_whole_answer_with_adapter(url: str) -> None:
    from lorax import Client

    client = Client(url, timeout=120)
    whole = client.generate("hello", adapter_id="ad1", max_new_tokens=8, stop_sequences=["zz"], return_full_text=True)
    frames = list(client.generate_stream("hello", adapter_id="ad1", max_new_tokens=8, stop_sequences=["zz"]))
    base = client.generate("hello", max_new_tokens=8)
    assert whole.generated_text == "hello" + "".join(f.token.text for f in frames)
    assert frames[-1].generated_text == whole.generated_text[len("hello") :]
    assert [f.token.id for f in frames] == [t.id for t in whole.details.tokens]
    assert [f.token.logprob for f in frames] == pytest.approx([t.logprob for t in whole.details.tokens], abs=1e-5)
    assert frames[-1].details.generated_tokens == whole.details.generated_tokens
    assert base.generated_text != whole.generated_text[len("hello") :]  # the adapter answered
    stop = whole.generated_text[len("hello") + 2 : len("hello") + 4]
    cut = client.generate("hello", adapter_id="ad1", max_new_tokens=8, stop_sequences=[stop])
    assert cut.details.finish_reason == "stop_sequence" and stop not in cut.generated_text


def test_async_client_seeded_sampling_and_best_of(url: str) -> None:
    from lorax import AsyncClient

    async def go():
        client = AsyncClient(url, timeout=120)
        one = await client.generate("hi", do_sample=True, seed=7, max_new_tokens=10, temperature=1.5, top_k=20)
        two = await client.generate("hi", do_sample=True, seed=7, max_new_tokens=10, temperature=1.5, top_k=20)
        other = await client.generate("hi", do_sample=True, seed=8, max_new_tokens=10, temperature=1.5, top_k=20)
        frames = [f async for f in client.generate_stream("hi", adapter_id="ad0", max_new_tokens=5)]
        best = await client.generate("hi", do_sample=True, best_of=3, max_new_tokens=5)
        return one, two, other, frames, best

    one, two, other, frames, best = asyncio.run(go())
    assert one.generated_text == two.generated_text != other.generated_text
    assert one.details.seed == 7
    assert len(frames) == 5 and frames[-1].details.finish_reason == "length"
    total = sum(t.logprob for t in best.details.tokens)
    others = [sum(t.logprob for t in s.tokens) for s in best.details.best_of_sequences]
    assert len(others) == 2 and all(total >= o for o in others)  # the most likely of the three


def test_unknown_adapter_and_refused_parameters_raise_the_clients_errors(url: str) -> None:
    from lorax import AsyncClient, Client
    from lorax.errors import BadRequestError, NotFoundError

    client = Client(url, timeout=60)
    with pytest.raises(NotFoundError):
        client.generate("hi", adapter_id="no-such-adapter")
    with pytest.raises(NotFoundError):
        list(client.generate_stream("hi", adapter_id="no-such-adapter"))
    with pytest.raises(NotFoundError):
        asyncio.run(AsyncClient(url).generate("hi", adapter_id="no-such-adapter"))
    with pytest.raises(BadRequestError, match="typical_p"):
        client.generate("hi", typical_p=0.5)
    with pytest.raises(BadRequestError, match="truncate"):
        client.generate("hi", truncate=3)


def test_response_format_json_through_the_client(url: str) -> None:
    import json

    from lorax import Client

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}  # fmt: skip
    client = Client(url, timeout=120)
    answer = client.generate("hi", max_new_tokens=40, response_format={"type": "json_object", "schema": schema})
    assert answer.details.finish_reason == "eos_token"
    assert set(json.loads(answer.generated_text)) == {"ok"}
