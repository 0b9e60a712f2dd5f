"""The Triton batched-LoRA kernels' checks, shared by the CPU tests (run in a subprocess under the Triton
interpreter) and the GPU tests (run in process on CUDA): `kernel_cases` against the float64 oracle in
`adapters.lora_reference`, and `engine_vs_peft`, the engine's greedy tokens with `lora_kernel: triton` against PEFT.

    TRITON_INTERPRET=1 python tests/triton_lora_cases.py kernels      # prints one JSON object per case
    TRITON_INTERPRET=1 python tests/triton_lora_cases.py engine       # prints {"got": ..., "want": ..., ...}
    python tests/triton_lora_cases.py kernels --device cuda --strict  # the same on a GPU (compiled kernels)

TRITON_INTERPRET must be set before `adapters.triton_lora` is imported (see `adapters.triton_runtime`), which is
why the CPU tests run this file in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# max |got - want| / max |want|: float32 accumulates like the oracle up to rounding; 16-bit outputs are rounded
TOLERANCE = {"float32": 2e-5, "bfloat16": 2e-2, "float16": 4e-3}
H_TOLERANCE = 2e-5  # h is float32 from exactly representable inputs, whatever the storage dtype


@dataclass(frozen=True)
class Case:
    name: str
    slots: tuple[int, ...]  # per-row slot (0 = no adapter)
    fan_in: int = 37
    fan_out: int = 29
    num_slots: int = 5  # including slot 0
    rank: int = 8  # slot rank
    ranks: tuple[int, ...] = ()  # per-adapter ranks (zero-padded to `rank`); default all `rank`
    dtype: str = "float32"
    layout: str = "plain"  # plain: [S, R, in] contiguous; bank: each matrix stored transposed (the slot bank's)
    kind: str = ""  # the path the plan must pick: sgmv or bgmv


CASES = [
    Case("one row", (2,), kind="sgmv"),
    Case("one row, no adapter", (0,), kind="sgmv"),
    Case("all rows on one adapter (odd count, two row tiles)", (3,) * 23, kind="sgmv"),
    Case("every row a different adapter", (1, 2, 3, 4, 5, 6, 7), num_slots=8, kind="bgmv"),
    Case("rows without adapter among others", (0, 3, 1, 0, 4, 4, 2, 0, 1, 3, 0, 2, 0), kind="bgmv"),
    Case("mixed ranks 1/3/8/16 padded to 16", (4, 1, 0, 2, 3, 3, 1, 4, 2), rank=16, ranks=(1, 3, 8, 16), kind="bgmv"),
    Case(
        "prefill segments, mixed ranks",
        (1,) * 5 + (0,) * 4 + (2,) * 17 + (3,),
        rank=16,
        ranks=(2, 16, 5, 8),
        kind="sgmv",
    ),  # fmt: skip
    Case("wide: k, out and rank loops", (1, 0, 2, 2, 1, 3), fan_in=300, fan_out=150, rank=72, kind="bgmv"),
    Case("wide segments", (1,) * 9 + (2,) * 9, fan_in=300, fan_out=150, rank=72, kind="sgmv"),
    Case("slot bank layout, decode rows", (2, 0, 1, 3, 4, 1), layout="bank", kind="bgmv"),
    Case("slot bank layout, segments", (2,) * 6 + (4,) * 6, layout="bank", kind="sgmv"),
    Case("bfloat16 decode rows", (1, 0, 2, 3, 4, 2, 1), dtype="bfloat16", kind="bgmv"),
    Case("bfloat16 segments", (3,) * 8 + (1,) * 8, dtype="bfloat16", kind="sgmv"),
    Case("float16 decode rows", (4, 3, 0, 2, 1), dtype="float16", kind="bgmv"),
]


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).abs().max() / max(float(want.abs().max()), 1e-30)) if want.numel() else 0.0


def _weights(case: Case, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, ...]]]:
    """a [S, r, in], b [S, out, r] (zero-padded, slot 0 zero) in the case's layout, and each adapter's unpadded
    (A, B) in float64."""
    dtype, s, r = DTYPES[case.dtype], case.num_slots, case.rank
    ranks = case.ranks or (r,) * (s - 1)
    if case.layout == "bank":
        a, b = torch.zeros(s, case.fan_in, r, dtype=dtype).transpose(1, 2), torch.zeros(s, r, case.fan_out, dtype=dtype)
        b = b.transpose(1, 2)
    else:
        a, b = torch.zeros(s, r, case.fan_in, dtype=dtype), torch.zeros(s, case.fan_out, r, dtype=dtype)
    exact: list[tuple[torch.Tensor, ...]] = [()]
    for slot in range(1, s):
        rank = ranks[(slot - 1) % len(ranks)]
        a_k = (torch.randn(rank, case.fan_in, generator=gen) / case.fan_in**0.5).to(dtype)
        b_k = torch.randn(case.fan_out, rank, generator=gen).to(dtype)
        a[slot, :rank], b[slot, :, :rank] = a_k, b_k
        exact.append((a_k.double(), b_k.double()))
    return a, b, exact


def run_kernel_case(case: Case, device: str, seed: int = 0) -> dict[str, Any]:
    """One case through `TritonRows`: h against the oracle, y = y0 + delta against the unpadded adapters."""
    from adapters.lora_reference import shrink_reference
    from adapters.triton_lora import TritonRows

    gen = torch.Generator().manual_seed(seed)
    dtype, rows = DTYPES[case.dtype], len(case.slots)
    a, b, exact = _weights(case, gen)
    x = torch.randn(rows, case.fan_in, generator=gen).to(dtype)
    y0 = torch.randn(rows, case.fan_out, generator=gen).to(dtype)
    idx = torch.tensor(case.slots)
    want_h = shrink_reference(x.double(), a.double(), idx)
    want_y = torch.stack([y0[n].double() + (x[n].double() @ exact[s][0].T @ exact[s][1].T if s else 0.0)
                          for n, s in enumerate(case.slots)])  # fmt: skip
    plan = TritonRows(list(case.slots), device)
    h = plan.shrink(x.to(device), a.to(device))
    y = y0.to(device, copy=True)  # (a copy also on CPU: y0 stays the before-image)
    plan.expand_add(y, h, b.to(device))
    h, y = h.cpu(), y.cpu()
    base_rows = [n for n, s in enumerate(case.slots) if s == 0]
    return {
        "name": case.name,
        "kind": plan.kind,
        "want_kind": case.kind,
        "h_dtype": str(h.dtype),
        "h_err": _relative(h, want_h),
        "y_err": _relative(y, want_y),
        "tolerance": TOLERANCE[case.dtype],
        "base_rows": len(base_rows),
        "base_rows_untouched": bool(torch.equal(y[base_rows], y0[base_rows])),
        "base_rows_h_zero": bool((h[base_rows] == 0).all()),
    }


def problems(result: dict[str, Any]) -> list[str]:
    """What is wrong with one `run_kernel_case` result (empty: it passes)."""
    found = []
    if result["kind"] != result["want_kind"]:
        found.append(f"path {result['kind']}, want {result['want_kind']}")
    if result["h_dtype"] != "torch.float32" or result["h_err"] >= H_TOLERANCE:
        found.append(f"h {result['h_dtype']} error {result['h_err']:.2e} (limit {H_TOLERANCE})")
    if result["y_err"] >= result["tolerance"]:
        found.append(f"y error {result['y_err']:.2e} (limit {result['tolerance']})")
    if not (result["base_rows_untouched"] and result["base_rows_h_zero"]):
        found.append("a row without adapter was written to")
    return found


def run_bank_case(device: str, seed: int = 1) -> dict[str, Any]:
    """`LoraBatch(kernel="triton")` over a real `LoraSlotBank` (tiny-llama shapes): every projection group of
    layer 1, mixed decode rows and a one-adapter plan reused for a longer chunk, against the oracle."""
    from adapters.batched_lora import LoraBatch
    from adapters.lora_files import BaseShapes
    from adapters.lora_reference import expand_reference, shrink_reference
    from adapters.slot_bank import GROUPS, LoraSlotBank

    config = SimpleNamespace(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                             intermediate_size=160, num_hidden_layers=2)  # fmt: skip
    bank = LoraSlotBank(BaseShapes.from_config(config), 4, 8, torch.float32, device)
    gen = torch.Generator().manual_seed(seed)
    bank.storage[1:] = (torch.randn(bank.storage[1:].shape, generator=gen) / 8).to(device)
    errors: dict[str, float] = {}
    modes = set()
    for label, slots, rows in [("decode", [3, 0, 1, 4, 2, 1, 0], 7), ("single", [2], 19)]:
        plan = LoraBatch(torch.tensor(slots, device=device), bank.storage, "triton")
        modes.add(plan.mode)
        idx = torch.tensor(slots * rows if len(slots) == 1 else slots)
        for group, projs in GROUPS.items():
            a = bank.a[group][1]
            x = torch.randn(rows, a.shape[2], generator=gen)
            outs = [torch.randn(rows, bank.b[p][1].shape[1], generator=gen) for p in projs]
            got = [o.to(device, copy=True) for o in outs]
            plan.apply(x.to(device), a, list(zip(got, [bank.b[p][1] for p in projs], strict=True)), bank.rank)
            h = shrink_reference(x.double(), a.double().cpu(), idx)
            for i, (p, o, g) in enumerate(zip(projs, outs, got, strict=True)):
                b = bank.b[p][1].double().cpu()
                want = o.double() + expand_reference(h[:, i * bank.rank : (i + 1) * bank.rank], b, idx)
                errors[f"{label} {p}"] = _relative(g.cpu(), want)
    return {"errors": errors, "modes": sorted(modes)}


def engine_vs_peft(device: str, max_new: int = 12) -> dict[str, Any]:
    """The engine's greedy tokens with `lora_kernel: triton` against PEFT run request by request (tiny model,
    float32, mixed ranks and targets, more adapters than slots). PEFT runs on CPU; the engine on `device`."""
    if str(REPO_ROOT / "tests") not in sys.path:
        sys.path.insert(0, str(REPO_ROOT / "tests"))
    from adapters import triton_lora

    calls = {"n": 0}
    apply = triton_lora.TritonRows.apply

    def counted(self: Any, *args: Any) -> None:
        calls["n"] += 1
        apply(self, *args)

    triton_lora.TritonRows.apply = counted  # type: ignore[method-assign]
    try:
        return _engine_vs_peft(device, max_new, calls)
    finally:
        triton_lora.TritonRows.apply = apply  # type: ignore[method-assign]


def _engine_vs_peft(device: str, max_new: int, calls: dict[str, int]) -> dict[str, Any]:
    from peft_reference import chat_ids, engine_greedy, peft_greedy

    from adapters.base_models import load_base
    from adapters.lora_files import BaseShapes
    from adapters.random_adapter import write_random_adapter
    from serve_app.engine import EngineConfig, LoraEngine

    cpu_base = load_base("tiny-llama", dtype="float32")
    shapes = BaseShapes.from_config(cpu_base.model.config, cpu_base.fingerprint, cpu_base.name)
    specs = {"r4-all": dict(rank=4, seed=1), "r8-qv": dict(rank=8, seed=2, targets=("q_proj", "v_proj")),
             "r16-rs": dict(rank=16, seed=3, use_rslora=True), "r2-mlp": dict(rank=2, seed=4,
             targets=("gate_proj", "up_proj", "down_proj"))}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {name: write_random_adapter(Path(tmp) / name, shapes, **kw) for name, kw in specs.items()}
        prompts = ["Tell me a story about a cat.", "What is 2+2?", "Hi", "List three fruits."]
        names = [None, *specs]
        requests = [(chat_ids(cpu_base.tokenizer, p), names[(i + j) % len(names)])
                    for i, p in enumerate(prompts) for j in range(2)]  # fmt: skip
        base = cpu_base if device == "cpu" else load_base("tiny-llama", device=device, dtype="float32")
        engine = LoraEngine(base, EngineConfig(device=device, dtype="float32", max_running=6, max_loras=3,
                                               max_lora_rank=16, prefill_chunk=16, lora_kernel="triton"))  # fmt: skip
        for name, folder in dirs.items():
            engine.register_adapter(name, folder)
        got, most_mixed = engine_greedy(engine, requests, max_new)
        want = peft_greedy(cpu_base, dirs, requests, max_new, engine.eos_ids)
    first_diff = [_first_difference(g, w) for g, w in zip(got, want, strict=True)]
    return {"got": got, "want": want, "first_diff": first_diff, "most_mixed": most_mixed,
            "triton_applies": calls["n"], "evictions": engine.bank.evictions}  # fmt: skip


def _first_difference(got: list[int], want: list[int]) -> int | None:
    """The first position where two token lists differ (a length difference counts), or None."""
    for i, (g, w) in enumerate(zip(got, want, strict=False)):
        if g != w:
            return i
    return None if len(got) == len(want) else min(len(got), len(want))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["kernels", "engine"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a check fails (for runs without pytest)")
    args = parser.parse_args()
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    failed: list[str] = []
    if args.what == "kernels":
        for case in CASES:
            result = run_kernel_case(case, args.device)
            print(json.dumps(result), flush=True)
            failed += [f"{case.name}: {p}" for p in problems(result)]
        bank = run_bank_case(args.device)
        print(json.dumps({"name": "slot bank", **bank}))
        failed += [f"slot bank {k}: error {e:.2e}" for k, e in bank["errors"].items() if e >= H_TOLERANCE]
    else:
        result = engine_vs_peft(args.device)
        print(json.dumps(result))
        if result["got"] != result["want"]:
            failed.append(
                f"engine tokens differ from PEFT's; first differing position per request {result['first_diff']}"
            )
    if args.strict and failed:
        sys.exit("FAILED:\n" + "\n".join(failed))


if __name__ == "__main__":
    main()
