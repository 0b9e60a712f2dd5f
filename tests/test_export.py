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


@pytest.mark.parametrize(
    ("change", "reason"),
    [({"use_dora": True}, "DoRA"), ({"modules_to_save": ["lm_head"]}, r"modules_to_save \['lm_head'\] cannot")],
)
def test_dora_and_modules_to_save_refused(catalog: Path, tmp_path: Path, change: dict, reason: str) -> None:
    _edit_config(catalog / "good", **change)
    with pytest.raises(ExportRefused, match=reason):
        _export(catalog, "good", "gguf-lora", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("fmt", "quant", "supported"),
    [("gguf", "q5_k", "f32, f16, q8_0, q4_0, q4_k_m"), ("gguf-lora", "q4_k_m", "f32, f16, q8_0")],
)
def test_unsupported_quant_refused_naming_the_choices(catalog: Path, tmp_path: Path, fmt, quant, supported) -> None:
    with pytest.raises(ExportRefused, match=rf"--quant {quant} is not supported for {fmt} \(supported: {supported}\)"):
        _export(catalog, "good", fmt, tmp_path / "out", quant=quant)
    with pytest.raises(ExportRefused, match=f"--quant {quant} is not supported"):  # the base alone too
        export(None, fmt, tmp_path / "out", quant=quant, base="tiny-llama")
    assert [p.name for p in tmp_path.iterdir()] == ["catalog"]


def test_q4_k_m_without_llama_cpp_refused_leaving_nothing(catalog: Path, tmp_path: Path, monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if the `export` extra were not installed
    with pytest.raises(ExportRefused, match=r"llama.cpp's own quantizer: install the `export` extra"):
        _export(catalog, "good", "gguf", tmp_path / "out", quant="q4_k_m")
    assert [p.name for p in tmp_path.iterdir()] == ["catalog"]  # no output, no temp folder, no f32 staging file


def test_log_to_mlflow_refusals_write_nothing(catalog: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportRefused, match="needs an MLflow tracking URI"):
        export("good", "peft", tmp_path / "out", base="tiny-llama", catalog_dir=catalog, log_to_mlflow=True)
    with pytest.raises(ExportRefused, match=r"needs an adapter from the MLflow registry; local:good:\S+ is local"):
        export("good", "peft", tmp_path / "out", base="tiny-llama", catalog_dir=catalog,
               mlflow_uri="http://127.0.0.1:9", log_to_mlflow=True)  # fmt: skip
    assert [p.name for p in tmp_path.iterdir()] == ["catalog"]


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


def test_tokenizers_llama_cpp_cannot_take_are_refused(tiny_base, tmp_path: Path) -> None:
    from adapters.export.gguf_llama import add_tokenizer, pre_tokenizer

    assert pre_tokenizer("smollm2-135m", ["a b"]) == "smollm" and pre_tokenizer("tiny-llama", []) == "default"
    with pytest.raises(ExportRefused, match=r"pre-tokenizer of base 'my-base'.*known: smollm2-135m"):
        pre_tokenizer("my-base", ["a b"])  # BPE with merges: llama.cpp must be told how it pre-splits
    with pytest.raises(ExportRefused, match="has no tokenizer.json"):
        add_tokenizer(None, tmp_path, "my-base", tiny_base.tokenizer, 259)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram"}}))
    with pytest.raises(ExportRefused, match="tokenizer is Unigram; the GGUF writer supports BPE"):
        add_tokenizer(None, tmp_path, "my-base", tiny_base.tokenizer, 259)


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


def test_export_folder_has_the_permissions_of_an_ordinary_folder(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    with atomic_folder(tmp_path / "out") as tmp:
        (tmp / "f.txt").write_text("x")
    assert (tmp_path / "out" / "f.txt").read_text() == "x"
    assert (tmp_path / "out").stat().st_mode == (tmp_path / "plain").stat().st_mode


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
    local = runner.invoke(app, ["export", "good", "--format", "peft", "--out", str(tmp_path / "p"), "--base",
                                "tiny-llama", "--catalog", str(catalog), "--mlflow", "http://127.0.0.1:9",
                                "--log-to-mlflow"])  # fmt: skip
    assert local.exit_code == 1 and "needs an adapter from the MLflow registry" in local.output
    assert not (tmp_path / "p").exists()


def test_completion_modelfile_keeps_prefix_literal(tiny_base) -> None:
    from adapters.export.ollama import modelfile_text
    from adapters.prompt_format import PromptFormat

    prompt = PromptFormat(mode="completion", prompt_prefix="Q {{x}}: ", stop=["###"])
    text = modelfile_text("m.gguf", prompt, tiny_base.tokenizer)
    assert 'TEMPLATE """Q {{ "{{" }}x}}: {{ .Prompt }}"""' in text
    assert 'PARAMETER stop "###"' in text and "<|im_end|>" not in text and "SYSTEM" not in text
