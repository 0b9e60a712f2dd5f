"""Adapter validation: what is accepted, what is refused, and that the reason says why."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters.lora_files import (
    CONFIG_FILE,
    META_BASE_FINGERPRINT,
    WEIGHTS_FILE,
    AdapterRejected,
    BaseShapes,
    quick_check,
    read_lora,
)
from adapters.random_adapter import write_random_adapter

SHAPES = BaseShapes(2, {"q_proj": (8, 8), "k_proj": (8, 4), "v_proj": (8, 4), "o_proj": (8, 8),
                        "gate_proj": (8, 12), "up_proj": (8, 12), "down_proj": (12, 8)}, "fp-base", "base")  # fmt: skip


def _edit_config(folder: Path, **changes: object) -> None:
    config = json.loads((folder / CONFIG_FILE).read_text())
    config.update(changes)
    (folder / CONFIG_FILE).write_text(json.dumps(config))


def test_valid_adapter_scale_is_folded_into_b(tmp_path: Path) -> None:
    folder = write_random_adapter(tmp_path / "a", SHAPES, rank=4, alpha=12)
    raw = load_file(str(folder / WEIGHTS_FILE))
    weights = read_lora(folder, SHAPES, max_rank=8)
    a, b = weights.modules[(1, "down_proj")]
    assert weights.rank == 4 and len(weights.modules) == 14
    assert torch.equal(a, raw["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"])
    torch.testing.assert_close(b, raw["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"] * 3.0)


def test_rslora_and_alpha_pattern_scales(tmp_path: Path) -> None:
    folder = write_random_adapter(tmp_path / "a", SHAPES, rank=4, alpha=8, use_rslora=True)
    _edit_config(folder, alpha_pattern={"q_proj": 16})
    raw = load_file(str(folder / WEIGHTS_FILE))
    weights = read_lora(folder, SHAPES, max_rank=8)
    key = "base_model.model.model.layers.0.self_attn.{}.lora_B.weight"
    torch.testing.assert_close(weights.modules[(0, "q_proj")][1], raw[key.format("q_proj")] * 16 / math.sqrt(4))
    torch.testing.assert_close(weights.modules[(0, "k_proj")][1], raw[key.format("k_proj")] * 8 / math.sqrt(4))


def test_partial_targets_are_fine(tmp_path: Path) -> None:
    folder = write_random_adapter(tmp_path / "a", SHAPES, rank=2, targets=("q_proj", "v_proj"))
    assert set(p for _, p in read_lora(folder, SHAPES, 8).modules) == {"q_proj", "v_proj"}


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda f: (f / WEIGHTS_FILE).rename(f / "adapter_model.bin"), "pickle"),
        (lambda f: (f / WEIGHTS_FILE).write_bytes(b"\x00" * 64), "corrupt"),
        (lambda f: (f / WEIGHTS_FILE).write_bytes((f / WEIGHTS_FILE).read_bytes()[:100]), "corrupt"),
        (lambda f: (f / CONFIG_FILE).unlink(), "adapter_config.json is missing"),
        (lambda f: (f / CONFIG_FILE).write_text("{oops"), "not valid JSON"),
        (lambda f: _edit_config(f, use_dora=True), "DoRA"),
        (lambda f: _edit_config(f, bias="all"), "bias"),
        (lambda f: _edit_config(f, modules_to_save=["lm_head"]), "modules_to_save"),
        (lambda f: _edit_config(f, peft_type="IA3"), "IA3"),
        (lambda f: _edit_config(f, r="sixteen"), "field 'r'"),
    ],
)
def test_refused_with_reason(tmp_path: Path, mutate, reason: str) -> None:
    folder = write_random_adapter(tmp_path / "a", SHAPES, rank=4)
    mutate(folder)
    with pytest.raises(AdapterRejected, match=reason):
        read_lora(folder, SHAPES, max_rank=8)
    assert quick_check(folder) is not None or reason in ("DoRA",)  # listing leaves it out too


def test_refuses_other_base_rank_nan_and_foreign_tensors(tmp_path: Path) -> None:
    other = BaseShapes(2, {**SHAPES.io, "q_proj": (16, 16)})  # no fingerprint: only the shapes can tell
    with pytest.raises(AdapterRejected, match="different base"):
        read_lora(write_random_adapter(tmp_path / "o", other, rank=4, targets=("q_proj",)), SHAPES, 8)
    with pytest.raises(AdapterRejected, match="exceeds the engine's max_lora_rank 8"):
        read_lora(write_random_adapter(tmp_path / "big", SHAPES, rank=16), SHAPES, 8)
    fingerprinted = write_random_adapter(tmp_path / "fp", BaseShapes(2, SHAPES.io, "different", "llama-x"), rank=4)
    with pytest.raises(AdapterRejected, match="trained on llama-x"):
        read_lora(fingerprinted, SHAPES, 8)
    for name, tensor_key in [("nan", "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"),
                             ("emb", "base_model.model.model.embed_tokens.lora_embedding_A")]:  # fmt: skip
        folder = write_random_adapter(tmp_path / name, SHAPES, rank=4)
        tensors = load_file(str(folder / WEIGHTS_FILE))
        tensors[tensor_key] = torch.full((4, 8), float("nan"))
        save_file(tensors, str(folder / WEIGHTS_FILE), metadata={META_BASE_FINGERPRINT: SHAPES.fingerprint})
        with pytest.raises(AdapterRejected, match="NaN" if name == "nan" else "not a LoRA A/B weight"):
            read_lora(folder, SHAPES, 8)
