"""The Triton kernels compile for a GPU without one: each kernel is compiled ahead of time for sm_90 (H100/H200)
with the argument types and block sizes its launcher uses, down to a cubin (triton's bundled ptxas). The
interpreter tests check what the kernels compute; this checks what only the GPU compiler sees (types across
branches and loops, `tl.dot` shapes and dtypes) — and that the 16-bit SGMV shrink really uses tensor cores.

    .venv/bin/python -m pytest -q tests/test_triton_compile.py
"""

from __future__ import annotations

from typing import Any

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from adapters import triton_lora  # noqa: E402
from serve_app.engine import paged_attention  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
BF16 = {"x_ptr": "bf16", "a_ptr": "bf16", "b_ptr": "bf16", "y_ptr": "bf16", "h_ptr": "fp32", "idx_ptr": "i32",
        "seg_ptr": "i32"}  # fmt: skip
FP32 = {**BF16, "x_ptr": "fp32", "a_ptr": "fp32", "b_ptr": "fp32", "y_ptr": "fp32"}
PAGED = {"q_ptr": "bf16", "k_ptr": "bf16", "v_ptr": "bf16", "out_ptr": "bf16", "tables_ptr": "i32",
         "lengths_ptr": "i32"}  # fmt: skip

KERNELS = [  # (id, kernel, pointer dtypes, constexprs as the launcher passes them)
    ("bgmv shrink bf16", triton_lora._bgmv_shrink, BF16, {"BLOCK_R": 64, "BLOCK_K": 128}),
    ("bgmv expand bf16", triton_lora._bgmv_expand, BF16, {"BLOCK_N": 128, "BLOCK_R": 16}),
    (
        "sgmv shrink bf16",
        triton_lora._sgmv_shrink,
        BF16,
        {"BLOCK_M": 16, "BLOCK_R": 64, "BLOCK_K": 64, "F32_DOT": False},
    ),  # fmt: skip
    (
        "sgmv shrink fp32",
        triton_lora._sgmv_shrink,
        FP32,
        {"BLOCK_M": 16, "BLOCK_R": 64, "BLOCK_K": 64, "F32_DOT": True},
    ),  # fmt: skip
    ("sgmv expand bf16", triton_lora._sgmv_expand, BF16, {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_R": 16}),
    ("paged decode bf16", paged_attention._paged_decode, PAGED, {"GROUP": 4, "BLOCK_SIZE": 16, "BLOCK_D": 128}),
]


def _compile(kernel: Any, pointers: dict[str, str], constexprs: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(kernel, triton.runtime.JITFunction):
        pytest.skip("this process runs Triton in the interpreter (TRITON_INTERPRET=1): nothing to compile")
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + pointers[name]
        else:
            signature[name] = "fp32" if name == "scale" else "i32"
    return triton.compile(ASTSource(kernel, signature, constexprs=constexprs), target=TARGET).asm


@pytest.mark.parametrize("kernel, pointers, constexprs", [k[1:] for k in KERNELS], ids=[k[0] for k in KERNELS])
def test_kernel_compiles_to_a_cubin_for_sm90(kernel, pointers, constexprs) -> None:
    asm = _compile(kernel, pointers, constexprs)
    assert len(asm["cubin"]) > 1000
    assert f".entry {kernel.__name__}" in asm["ptx"]
    if kernel is triton_lora._sgmv_shrink:
        tensor_cores = "mma" in asm["ptx"]
        assert tensor_cores == (not constexprs["F32_DOT"])  # bf16 tiles on tensor cores; float32 in full precision
