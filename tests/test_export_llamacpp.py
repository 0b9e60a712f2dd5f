"""Exports checked by real llama.cpp (llama-cpp-python, installed by `make install` from the `export` extra):
greedy tokens of the merged GGUF and of base GGUF + LoRA GGUF equal the serving engine's greedy tokens with the
adapter, on the tiny random Llama (its wide init gives clear argmax margins). Prompts are given as token ids, and
llama.cpp's own tokenizer is checked separately against the Hugging Face one.

    .venv/bin/python -m pytest -q tests/test_export_llamacpp.py
Quality of q8_0 / q4_0 on a trained SmolLM2 adapter (all eval rows): `python -m bench.export_quality`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapters.export import export
from adapters.export.llama_cpp_run import greedy, load
from adapters.prompt_format import PROMPT_FILE
from adapters.random_adapter import write_random_adapter
from tests.export_helpers import PROMPT_META, PROMPTS, engine_greedy

N_NEW = 24
# f16 export: weights are rounded to float16. Measured on this fixture (2026-12-04): llama.cpp's logits of the f16
# export differ from the f32 export's by at most 0.058 along the reference continuation, and all 72 tokens were
# equal. A step whose top-2 margin is under twice that may legitimately pick the other token; nothing else may.
F16_MARGIN = 0.12


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, tiny_shapes) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llamacpp")
    catalog = root / "catalog"
    write_random_adapter(catalog / "good", tiny_shapes, rank=8, alpha=16, scale=0.5, seed=1)
    (catalog / "good" / PROMPT_FILE).write_text(json.dumps(PROMPT_META))
    files = {"catalog": catalog / "good"}
    for fmt, quant in (("gguf", "f32"), ("gguf", "f16"), ("gguf-lora", "f32"), ("gguf-lora", "f16")):
        result = export("good", fmt, root / f"{fmt}-{quant}", quant=quant, base="tiny-llama", catalog_dir=catalog)
        files[f"{fmt}-{quant}"] = result.files[0]
    files["base-f32"] = export(None, "gguf", root / "base", quant="f32", base="tiny-llama").files[0]
    return files


@pytest.fixture(scope="module")
def prompts(tiny_base) -> list[list[int]]:
    return [tiny_base.tokenizer(p, add_special_tokens=False).input_ids for p in PROMPTS]


@pytest.fixture(scope="module")
def reference(tiny_base, exported, prompts) -> list[list[int]]:
    return engine_greedy(tiny_base, exported["catalog"], prompts, N_NEW)


def _llama_cpp_tokens(model: Path, prompts: list[list[int]], lora: Path | None = None) -> list[list[int]]:
    llm = load(str(model), str(lora) if lora else None)
    return [greedy(llm, ids, N_NEW).tokens for ids in prompts]


def test_merged_f32_gguf_greedy_equals_engine(exported, prompts, reference) -> None:
    assert _llama_cpp_tokens(exported["gguf-f32"], prompts) == reference


def test_base_plus_lora_gguf_greedy_equals_engine(exported, prompts, reference, tiny_base) -> None:
    assert _llama_cpp_tokens(exported["base-f32"], prompts, exported["gguf-lora-f32"]) == reference
    base_only = engine_greedy(tiny_base, None, prompts, N_NEW)
    assert _llama_cpp_tokens(exported["base-f32"], prompts) == base_only != reference  # the LoRA is what differs


def test_f16_exports_equal_engine_except_near_ties(exported, prompts, reference) -> None:
    """Where llama.cpp's f16 run differs from the engine, its own top-2 margin at that step was below F16_MARGIN."""
    for model, lora in ((exported["gguf-f16"], None), (exported["base-f32"], exported["gguf-lora-f16"])):
        llm = load(str(model), str(lora) if lora else None)
        for ids, expected in zip(prompts, reference, strict=True):
            got = greedy(llm, ids, N_NEW)
            first_diff = next((i for i, (a, b) in enumerate(zip(got.tokens, expected, strict=True)) if a != b), None)
            if first_diff is not None:
                assert got.margins[first_diff] < F16_MARGIN, (model.name, first_diff, got.margins[first_diff])


def test_llama_cpp_tokenizer_and_template_match(exported, tiny_base) -> None:
    llm = load(str(exported["gguf-f16"]))
    for text in PROMPTS:
        assert (
            llm.tokenize(text.encode(), add_bos=False, special=True)
            == tiny_base.tokenizer(text, add_special_tokens=False).input_ids
        )
    assert llm.metadata["tokenizer.chat_template"] == tiny_base.tokenizer.chat_template
    assert llm.token_eos() == tiny_base.tokenizer.eos_token_id
