"""Exports checked by real llama.cpp (llama-cpp-python, installed by `make install` from the `export` extra):
greedy tokens of the merged GGUF and of base GGUF + LoRA GGUF equal the serving engine's greedy tokens with the
adapter, on the tiny random Llama (its wide init gives clear argmax margins). Prompts are given as token ids, and
llama.cpp's own tokenizer is checked separately against the Hugging Face one. q4_k_m (made by llama.cpp's own
quantizer) is checked on a 256-wide tiny Llama, where K-quant blocks apply: llama.cpp's Q4_K_M mix of the merged
weights, with the metadata kept, and closer to the f32 export in llama.cpp than q4_0 is.

    .venv/bin/python -m pytest -q tests/test_export_llamacpp.py
Quality of q8_0 / q4_0 / q4_k_m on a trained SmolLM2 adapter (all eval rows): `python -m bench.export_quality`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from adapters.export import export
from adapters.export.llama_cpp_run import greedy, last_logits, load
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


# --- q4_k_m (llama.cpp's quantizer) ------------------------------------------------------------------------------

# Rows a multiple of 256, so Q4_K / Q6_K blocks apply (llama.cpp falls back to Q5_0 / Q8_0 for narrower rows).
KQUANT_SHAPE = {"hidden_size": 256, "intermediate_size": 512}


@pytest.fixture(scope="module")
def kquant(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from adapters.base_models import load_base
    from adapters.lora_files import BaseShapes
    from adapters.tiny_llama import tiny_llama_dir

    base_dir = tiny_llama_dir(**KQUANT_SHAPE)
    base = load_base(str(base_dir))
    root = tmp_path_factory.mktemp("kquant")
    shapes = BaseShapes.from_config(base.model.config, base.fingerprint, base.name)
    write_random_adapter(root / "catalog" / "good", shapes, rank=8, alpha=16, scale=0.5, seed=1)
    files = {q: export("good", "gguf", root / q, quant=q, base=str(base_dir), catalog_dir=root / "catalog").files[0]
             for q in ("f32", "q4_0", "q4_k_m")}  # fmt: skip
    files["base-f32"] = export(None, "gguf", root / "base", quant="f32", base=str(base_dir)).files[0]
    return files


def _matrices(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """Every 2-D tensor of a GGUF, dequantized by the gguf package: name -> (GGML type, float32 [rows, cols])."""
    import gguf
    from gguf.quants import dequantize

    return {t.name: (t.tensor_type.name, dequantize(t.data, t.tensor_type).reshape(list(reversed(t.shape.tolist()))))
            for t in gguf.GGUFReader(str(path)).tensors if len(t.shape) == 2}  # fmt: skip


def test_q4_k_m_is_llama_cpps_mix_of_the_merged_weights(kquant) -> None:
    import gguf

    path = kquant["q4_k_m"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["Modelfile", "good-q4_k_m.gguf"]  # staging file gone
    assert "FROM ./good-q4_k_m.gguf" in (path.parent / "Modelfile").read_text()
    fields = {k: f.contents() for k, f in gguf.GGUFReader(str(path)).fields.items() if k.startswith("tokenizer.")}
    ref = {k: f.contents() for k, f in gguf.GGUFReader(str(kquant["f32"])).fields.items() if k.startswith("tokenizer.")}
    assert fields == ref and "tokenizer.chat_template" in fields
    assert gguf.GGUFReader(str(path)).fields["general.file_type"].contents() == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    quantized, merged, base = _matrices(path), _matrices(kquant["f32"]), _matrices(kquant["base-f32"])
    types = {name: kind for name, (kind, _) in quantized.items()}
    assert types["output.weight"] == "Q6_K" and set(types.values()) == {"Q4_K", "Q6_K"}
    assert "Q6_K" in {types["blk.1.attn_v.weight"], types["blk.1.ffn_down.weight"]}  # the _M part of the mix
    bound = {"Q4_K": 0.08, "Q6_K": 0.02}  # relative RMS error of 4.5 / 6.5 bits per weight (0.072 / 0.018 here)
    for name, (kind, weights) in quantized.items():
        reference = merged[name][1]
        error = np.linalg.norm(weights - reference) / np.linalg.norm(reference)
        assert error < bound[kind], (name, kind, error)
        if name.startswith("blk."):  # the adapter is merged in: far closer to base + LoRA than to the base
            assert np.linalg.norm(weights - base[name][1]) / np.linalg.norm(reference) > 2 * error, name


def test_q4_k_m_in_llama_cpp_is_closer_to_f32_than_q4_0(kquant, prompts) -> None:
    """llama.cpp's logits along the f32 export's greedy continuation (measured: relative RMS error 0.64 for q4_k_m,
    0.69 for q4_0, relative to the logits' spread: this wide random model amplifies weight noise)."""
    reference = load(str(kquant["f32"]))
    continuations = [greedy(reference, ids, N_NEW).tokens for ids in prompts]

    def logits(path: Path) -> np.ndarray:
        llm = load(str(path))
        rows = []
        for ids, continuation in zip(prompts, continuations, strict=True):
            llm.reset()
            llm.eval(list(ids))
            for token in continuation:
                rows.append(last_logits(llm))
                llm.eval([token])
        return np.array(rows)

    f32 = logits(kquant["f32"])
    error = {q: float(np.sqrt(((logits(kquant[q]) - f32) ** 2).mean()) / f32.std()) for q in ("q4_0", "q4_k_m")}
    assert error["q4_k_m"] < error["q4_0"] < 1.0, error


def test_quantizer_failure_is_refused_with_llama_cpps_reason(tmp_path: Path) -> None:
    from adapters.export import ExportRefused
    from adapters.export.gguf_kquant import quantize_gguf

    (tmp_path / "bad.gguf").write_text("not a gguf")
    with pytest.raises(ExportRefused, match=r"(?s)quantizer failed to write q4_k_m.*invalid magic"):
        quantize_gguf(tmp_path / "bad.gguf", tmp_path / "out.gguf", "q4_k_m")
    assert not (tmp_path / "out.gguf").exists()
