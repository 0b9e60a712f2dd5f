"""Tests for `lorafleet export` without llama.cpp: refusals with reasons, atomic output, the PEFT and merged formats
(merged greedy tokens equal the serving engine's with the adapter), GGUF metadata, the Modelfile, the CLI.

    .venv/bin/python -m pytest -q tests/test_export.py
The llama.cpp checks are in tests/test_export_llamacpp.py, MLflow logging in tests/test_export_mlflow.py.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters.export import ExportRefused, export
from adapters.export.prepare import atomic_folder, check_base_for_llama_cpp, load_source
from adapters.lora_files import CONFIG_FILE, WEIGHTS_FILE
from adapters.prompt_format import PROMPT_FILE
from adapters.random_adapter import write_random_adapter
from tests.export_helpers import PROMPT_META, PROMPTS, engine_greedy


@pytest.fixture
def catalog(tmp_path: Path, tiny_shapes) -> Path:
    """A local catalog with `good` (rank 8, prompt metadata) for the tiny Llama."""
    root = tmp_path / "catalog"
    write_random_adapter(root / "good", tiny_shapes, rank=8, alpha=16, scale=0.5, seed=1)
    (root / "good" / PROMPT_FILE).write_text(json.dumps(PROMPT_META))
    return root


def _export(catalog: Path, model: str, fmt: str, out: Path, quant: str | None = None):
    return export(model, fmt, out, quant=quant, base="tiny-llama", catalog_dir=catalog)


def _edit_config(folder: Path, **changes: object) -> None:
    config = json.loads((folder / CONFIG_FILE).read_text())
    config.update(changes)
    (folder / CONFIG_FILE).write_text(json.dumps(config))


# --- refusals ---------------------------------------------------------------------------------------------------


def test_dora_refused(catalog: Path, tmp_path: Path) -> None:
    _edit_config(catalog / "good", use_dora=True)
    with pytest.raises(ExportRefused, match="DoRA"):
        _export(catalog, "good", "gguf-lora", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_lm_head_lora_refused_naming_the_module(catalog: Path, tmp_path: Path) -> None:
    weights = catalog / "good" / WEIGHTS_FILE
    tensors = load_file(str(weights))
    tensors["base_model.model.lm_head.lora_A.weight"] = torch.zeros(8, 64)
    tensors["base_model.model.lm_head.lora_B.weight"] = torch.zeros(259, 8)
    save_file(tensors, str(weights))
    with pytest.raises(ExportRefused, match=r"LoRA on lm_head cannot be exported.*q_proj"):
        _export(catalog, "good", "gguf", tmp_path / "out")


def test_unsupported_dtype_refused(catalog: Path, tmp_path: Path) -> None:
    weights = catalog / "good" / WEIGHTS_FILE
    tensors = {k: v.double() for k, v in load_file(str(weights)).items()}
    save_file(tensors, str(weights))
    with pytest.raises(ExportRefused, match=r"dtype\(s\) \['F64'\]"):
        _export(catalog, "good", "peft", tmp_path / "out")


def test_rank_over_writer_limit_refused(tmp_path: Path, tiny_shapes) -> None:
    write_random_adapter(tmp_path / "cat" / "big", tiny_shapes, rank=257, targets=("v_proj",))
    with pytest.raises(ExportRefused, match="rank 257 exceeds"):
        _export(tmp_path / "cat", "big", "gguf-lora", tmp_path / "out")


def test_q8_0_lora_needs_rank_multiple_of_32(catalog: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportRefused, match="row size 8 is not a multiple of 32"):
        _export(catalog, "good", "gguf-lora", tmp_path / "out", quant="q8_0")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["catalog"]  # no temp folder left behind


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "architecture"),
        ({"attention_bias": True}, "biases"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}}, "RoPE scaling 'llama3'"),
    ],
)
def test_bases_llama_cpp_cannot_take_are_refused(tiny_base, change: dict, reason: str) -> None:
    config = copy.deepcopy(tiny_base.model.config)
    for key, value in change.items():
        setattr(config, key, value)
    with pytest.raises(ExportRefused, match=reason):
        check_base_for_llama_cpp(config)
    check_base_for_llama_cpp(tiny_base.model.config)  # the unchanged base passes


def test_unknown_model_refused(catalog: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportRefused, match="does not exist"):
        _export(catalog, "nope", "peft", tmp_path / "out")
    with pytest.raises(ExportRefused, match="not a valid model id"):
        _export(catalog, "../good", "peft", tmp_path / "out")


def test_failed_export_leaves_no_file(tmp_path: Path) -> None:
    """A base whose MLP width (72) q8_0 cannot block: refused mid-write, nothing at --out, no temp folder."""
    from adapters.lora_files import BaseShapes
    from adapters.tiny_llama import tiny_llama_dir

    base_dir = tiny_llama_dir(intermediate_size=72)
    from adapters.base_models import load_base

    base = load_base(str(base_dir))
    shapes = BaseShapes.from_config(base.model.config, base.fingerprint, base.name)
    write_random_adapter(tmp_path / "cat" / "odd", shapes, rank=4)
    with pytest.raises(ExportRefused, match="row size 72 is not a multiple of 32"):
        export("odd", "gguf", tmp_path / "out", quant="q8_0", base=str(base_dir), catalog_dir=tmp_path / "cat")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat"]


def test_existing_output_is_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ExportRefused, match="already exists"), atomic_folder(tmp_path / "out"):
        pass
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


# --- formats ----------------------------------------------------------------------------------------------------


def test_peft_export_is_the_served_files_plus_prompt(catalog: Path, tmp_path: Path) -> None:
    result = _export(catalog, "good", "peft", tmp_path / "out")
    assert sorted(p.name for p in result.files) == sorted([CONFIG_FILE, WEIGHTS_FILE, PROMPT_FILE])
    for file in (CONFIG_FILE, WEIGHTS_FILE, PROMPT_FILE):
        assert (tmp_path / "out" / file).read_bytes() == (catalog / "good" / file).read_bytes()
    assert result.adapter_id.startswith("local:good:")


def test_merged_export_greedy_equals_engine(catalog: Path, tmp_path: Path, tiny_base) -> None:
    from adapters.base_models import load_base

    _export(catalog, "good", "merged", tmp_path / "merged")
    merged = load_base(str(tmp_path / "merged"))
    prompts = [tiny_base.tokenizer(p, add_special_tokens=False).input_ids for p in PROMPTS]
    expected = engine_greedy(tiny_base, catalog / "good", prompts, 24)
    assert engine_greedy(merged, None, prompts, 24) == expected
    assert expected != engine_greedy(tiny_base, None, prompts, 24)  # the adapter changes the output
    assert json.loads((tmp_path / "merged" / PROMPT_FILE).read_text()) == {**PROMPT_META, "prompt_prefix": None,
                                                                           "format": "input_output"}  # fmt: skip


def test_gguf_metadata_and_modelfile(catalog: Path, tmp_path: Path, tiny_base) -> None:
    import gguf

    result = _export(catalog, "good", "gguf", tmp_path / "g", quant="q4_0")
    assert [p.name for p in result.files] == ["good-q4_0.gguf", "Modelfile"]
    reader = gguf.GGUFReader(str(tmp_path / "g" / "good-q4_0.gguf"))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.merges")}
    assert fields["general.architecture"] == "llama"
    assert fields["tokenizer.chat_template"] == tiny_base.tokenizer.chat_template
    assert fields["tokenizer.ggml.tokens"] == tiny_base.tokenizer.convert_ids_to_tokens(list(range(259)))
    assert fields["tokenizer.ggml.eos_token_id"] == tiny_base.tokenizer.eos_token_id
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_0" and types["token_embd.weight"] == "Q8_0"
    assert types["blk.0.attn_norm.weight"] == "F32"
    modelfile = (tmp_path / "g" / "Modelfile").read_text()
    assert "FROM ./good-q4_0.gguf" in modelfile
    assert f'SYSTEM """{PROMPT_META["system_prompt"]}"""' in modelfile
    assert 'PARAMETER stop "\\n\\n"' in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "<|im_start|>{{ .Role }}" in modelfile


def test_modelfile_without_prompt_metadata_says_so(catalog: Path, tmp_path: Path) -> None:
    (catalog / "good" / PROMPT_FILE).unlink()
    result = _export(catalog, "good", "gguf", tmp_path / "g", quant="f16")
    modelfile = (tmp_path / "g" / "Modelfile").read_text()
    assert "SYSTEM" not in modelfile.replace("add the SYSTEM", "") and "no lorafleet_prompt.json" in modelfile
    assert any("lorafleet_prompt.json" in note for note in result.notes)


def test_bad_prompt_metadata_names_the_field(catalog: Path, tmp_path: Path) -> None:
    (catalog / "good" / PROMPT_FILE).write_text(json.dumps({"mode": "poetry"}))
    with pytest.raises(ExportRefused, match=rf"{PROMPT_FILE} is not valid \(mode"):
        load_source(catalog / "good", "tiny-llama")


def test_cli_export_and_refusal(catalog: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cluster.cli import app

    runner = CliRunner()
    ok = runner.invoke(app, ["export", "good", "--format", "gguf-lora", "--out", str(tmp_path / "l"),
                             "--base", "tiny-llama", "--catalog", str(catalog)])  # fmt: skip
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "l" / "good-lora-f16.gguf").is_file()
    bad = runner.invoke(app, ["export", "good", "--format", "merged", "--quant", "q4_0", "--out",
                              str(tmp_path / "m"), "--base", "tiny-llama", "--catalog", str(catalog)])  # fmt: skip
    assert bad.exit_code == 1 and "--quant applies to gguf and gguf-lora" in bad.output
    assert not (tmp_path / "m").exists()


def test_completion_modelfile_keeps_prefix_literal(tiny_base) -> None:
    from adapters.export.ollama import modelfile_text
    from adapters.prompt_format import PromptFormat

    prompt = PromptFormat(mode="completion", prompt_prefix="Q {{x}}: ", stop=["###"])
    text = modelfile_text("m.gguf", prompt, tiny_base.tokenizer)
    assert 'TEMPLATE """Q {{ "{{" }}x}}: {{ .Prompt }}"""' in text
    assert 'PARAMETER stop "###"' in text and "<|im_end|>" not in text and "SYSTEM" not in text
