"""The paged-attention decode kernel's checks, shared by the CPU test (a subprocess under the Triton interpreter)
and the GPU test (in process on CUDA): sequences grow token by token through a `BlockManager` (so their blocks
interleave, and a finished sequence's blocks are reused), their K/V are written with `write_kv`, and
`paged_decode` is compared with the float64 reference and with `scaled_dot_product_attention` over each row's
contiguous K/V (an oracle that knows nothing of blocks).

    TRITON_INTERPRET=1 python tests/paged_attention_cases.py          # one JSON object per case
    python tests/paged_attention_cases.py --device cuda --strict
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}


@dataclass(frozen=True)
class Case:
    name: str
    lengths: tuple[int, ...]
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    block_size: int = 16
    dtype: str = "float32"


CASES = [
    Case("one row, one token", (1,)),
    Case("GQA, partial and full blocks", (1, 17, 33, 16, 5)),
    Case("MHA, head_dim 24 (masked), block 32", (40, 2, 64), heads=3, kv_heads=3, head_dim=24, block_size=32),
    Case("MQA, long row next to short ones", (70, 1, 9), heads=4, kv_heads=1),
    Case("bfloat16", (23, 8, 41), dtype="bfloat16"),
]


def run_case(case: Case, device: str, seed: int = 0) -> dict[str, Any]:
    from serve_app.engine.block_manager import BlockManager
    from serve_app.engine.paged_attention import paged_decode, paged_decode_reference, write_kv

    dtype = getattr(torch, case.dtype)
    gen = torch.Generator().manual_seed(seed)
    rows = len(case.lengths)
    manager = BlockManager(
        num_blocks=sum(-(-n // case.block_size) for n in case.lengths) + 2, block_size=case.block_size
    )
    manager.allocate("gone", 2 * case.block_size)  # finishes below: its blocks are reused by the rows
    ids = list(range(rows))
    for row in ids:
        manager.allocate(row, 1)
    manager.free("gone")
    for step in range(1, max(case.lengths)):  # grow round-robin: the rows' blocks interleave
        for row in ids:
            if step < case.lengths[row]:
                manager.append_slot(row)
    shape = (manager.num_blocks, case.block_size, case.kv_heads, case.head_dim)
    k_cache = torch.zeros(shape, dtype=dtype, device=device)
    v_cache = torch.zeros(shape, dtype=dtype, device=device)
    contiguous = []
    for row in ids:
        n = case.lengths[row]
        k = torch.randn(n, case.kv_heads, case.head_dim, generator=gen).to(dtype)
        v = torch.randn(n, case.kv_heads, case.head_dim, generator=gen).to(dtype)
        slots = torch.tensor(manager.slots(row, 0, n), device=device)
        write_kv(k_cache, v_cache, slots, k.to(device), v.to(device))
        contiguous.append((k, v))
    q = torch.randn(rows, case.heads, case.head_dim, generator=gen).to(dtype)
    tables, lengths = manager.block_tables(ids, device)
    scale = case.head_dim**-0.5
    got = paged_decode(q.to(device), k_cache, v_cache, tables, lengths, scale).cpu()
    reference = paged_decode_reference(q.to(device), k_cache, v_cache, tables, lengths, scale).cpu()
    group = case.heads // case.kv_heads
    sdpa = torch.stack([
        F.scaled_dot_product_attention(q[row].double()[:, None], k.double().repeat_interleave(group, 1).transpose(0, 1),
                                       v.double().repeat_interleave(group, 1).transpose(0, 1), scale=scale)[:, 0]
        for row, (k, v) in enumerate(contiguous)
    ])  # fmt: skip

    def relative(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.double() - b.double()).abs().max() / b.double().abs().max())

    return {
        "name": case.name,
        "err_vs_reference": relative(got, reference),
        "err_vs_sdpa": relative(got, sdpa),
        "reference_vs_sdpa": relative(reference, sdpa),
        "tolerance": TOLERANCE[case.dtype],
        "blocks_interleaved": any(t[1] - t[0] != 1 for t in (manager.table(r) for r in ids) if len(t) > 1),
        "reused_blocks": bool(set(sum((manager.table(r) for r in ids), [])) & {0, 1}),
    }


def problems(result: dict[str, Any]) -> list[str]:
    """What is wrong with one `run_case` result (empty: it passes)."""
    return [f"{key} {result[key]:.2e} (limit {result['tolerance']})"
            for key in ("err_vs_reference", "err_vs_sdpa", "reference_vs_sdpa") if result[key] >= result["tolerance"]]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a check fails (for runs without pytest)")
    args = parser.parse_args()
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    failed = []
    for case in CASES:
        result = run_case(case, args.device)
        print(json.dumps(result), flush=True)
        failed += [f"{case.name}: {p}" for p in problems(result)]
    if args.strict and failed:
        sys.exit("FAILED:\n" + "\n".join(failed))


if __name__ == "__main__":
    main()
