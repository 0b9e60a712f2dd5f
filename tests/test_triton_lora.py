"""The Triton batched-LoRA kernels (adapters/triton_lora.py): on CPU under the Triton interpreter (each check in a
fresh process with TRITON_INTERPRET=1, see tests/triton_lora_cases.py) and, marked `gpu`, compiled on CUDA.

    .venv/bin/python -m pytest -q tests/test_triton_lora.py            # CPU: ~10 s kernels + ~30 s engine vs PEFT
    .venv/bin/python -m pytest -q -m gpu tests/test_triton_lora.py     # on a GPU machine
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from triton_lora_cases import CASES, H_TOLERANCE, engine_vs_peft, problems, run_bank_case, run_kernel_case

REPO_ROOT = Path(__file__).resolve().parents[1]


def _interpreted(what: str) -> list[dict[str, Any]]:
    """Run tests/triton_lora_cases.py `what` in a fresh process under the Triton interpreter; its JSON lines."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "triton_lora_cases.py"), what],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def interpreted_kernels() -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in _interpreted("kernels")}


def _check_case(result: dict[str, Any]) -> None:
    assert not problems(result), (problems(result), result)  # incl. rows without adapter: y bit for bit as before


@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_kernels_match_the_float64_oracle_under_the_interpreter(interpreted_kernels, name: str) -> None:
    _check_case(interpreted_kernels[name])


def test_cases_cover_both_kernels_base_rows_and_16_bit(interpreted_kernels) -> None:
    results = [interpreted_kernels[c.name] for c in CASES]
    assert {r["kind"] for r in results} == {"sgmv", "bgmv"}
    assert sum(r["base_rows"] for r in results) >= 5
    assert any(c.dtype == "bfloat16" and c.kind == "sgmv" for c in CASES)


def test_lora_batch_dispatches_to_triton_over_the_slot_bank(interpreted_kernels) -> None:
    bank = interpreted_kernels["slot bank"]
    assert bank["modes"] == ["triton"]
    assert len(bank["errors"]) == 14 and max(bank["errors"].values()) < H_TOLERANCE, bank["errors"]


def test_engine_with_triton_kernels_equals_peft_token_for_token() -> None:
    (result,) = _interpreted("engine")
    assert result["got"] == result["want"], f"first differing position per request: {result['first_diff']}"
    assert result["triton_applies"] > 0 and result["most_mixed"] >= 3 and result["evictions"] > 0


def test_triton_kernel_on_cpu_without_the_interpreter_is_a_clear_startup_error(tiny_base) -> None:
    from serve_app.engine import EngineConfig, LoraEngine

    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0")  # (this process compiles kernels, as in serving)
    with pytest.raises(RuntimeError, match="lora_kernel 'triton'.*CUDA.*TRITON_INTERPRET=1"):
        LoraEngine(tiny_base, EngineConfig(device="cpu", lora_kernel="triton"))


def test_auto_picks_triton_only_on_cuda(monkeypatch) -> None:
    from adapters import triton_runtime
    from adapters.batched_lora import LoraBatch

    assert not triton_runtime.auto_picks(torch.device("cpu"))
    assert LoraBatch(torch.tensor([1, 2, 0]), kernel="auto").mode != "triton"
    monkeypatch.setenv("LORAFLEET_TRITON_LORA", "0")
    assert not triton_runtime.auto_picks(torch.device("cuda"))


# -- on a GPU: the same checks with compiled kernels ----------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_kernels_match_the_float64_oracle_on_cuda(case) -> None:
    _check_case(run_kernel_case(case, "cuda"))


@pytest.mark.gpu
def test_lora_batch_auto_uses_triton_on_cuda() -> None:
    from adapters.batched_lora import LoraBatch

    assert LoraBatch(torch.tensor([1, 2, 0], device="cuda"), kernel="auto").mode == "triton"
    assert LoraBatch(torch.tensor([2, 2], device="cuda"), kernel="auto").mode == "single"  # cuBLAS for one adapter
    bank = run_bank_case("cuda")
    assert bank["modes"] == ["triton"] and max(bank["errors"].values()) < H_TOLERANCE, bank["errors"]


@pytest.mark.gpu
def test_engine_on_cuda_with_triton_kernels_equals_peft_token_for_token() -> None:
    result = engine_vs_peft("cuda")
    assert result["got"] == result["want"], f"first differing position per request: {result['first_diff']}"
    assert result["triton_applies"] > 0 and result["most_mixed"] >= 3


def test_per_row_plan_reads_the_given_slot_tensor_and_refuses_other_dtypes() -> None:
    """`TritonRows.per_row` (CUDA-graph decode's static slots): a BGMV plan over the caller's tensor, not a copy."""
    from adapters.triton_lora import TritonRows

    idx = torch.tensor([0, 3, 1], dtype=torch.int32)
    plan = TritonRows.per_row(idx)
    assert (plan.kind, plan.rows) == ("bgmv", 3) and plan._idx is idx
    with pytest.raises(ValueError, match="1-d int32"):
        TritonRows.per_row(idx.long())
