"""The native CPU batched-LoRA kernel (adapters/native_lora.py + adapters/kernels/bgmv_cpu.c): its results against
the float64 per-row oracle on the slot bank's own layout, the plans that use it, and what happens without it."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from adapters import native_lora
from adapters.batched_lora import LoraBatch
from adapters.kernel_build import KERNELS
from adapters.lora_files import BaseShapes, LoraAdapterConfig, LoraWeights
from adapters.lora_reference import expand_reference, shrink_reference
from adapters.slot_bank import GROUPS, LoraSlotBank

needs_kernel = pytest.mark.skipif(
    not native_lora.available(), reason=f"native kernel not built here: {native_lora.unavailable_reason()}"
)
# Widths that reach every column path of the kernel: 32- and 16-column blocks, 8-column blocks, single columns.
SHAPES = BaseShapes(2, {"q_proj": (40, 40), "k_proj": (40, 12), "v_proj": (40, 12), "o_proj": (40, 40),
                        "gate_proj": (40, 72), "up_proj": (40, 72), "down_proj": (72, 40)})  # fmt: skip
RANK = 8


def _weights(rank: int, seed: int) -> LoraWeights:
    gen = torch.Generator().manual_seed(seed)
    modules = {(layer, proj): (torch.randn(rank, fan_in, generator=gen), torch.randn(fan_out, rank, generator=gen))
               for layer in range(SHAPES.num_layers) for proj, (fan_in, fan_out) in SHAPES.io.items()}  # fmt: skip
    return LoraWeights(LoraAdapterConfig(r=rank, lora_alpha=rank), modules, rank)


@pytest.fixture(scope="module")
def bank() -> LoraSlotBank:
    bank = LoraSlotBank(SHAPES, num_slots=6, max_rank=RANK)
    for slot in range(1, 7):
        bank.acquire(f"a{slot}", _weights(2 + slot % 7, seed=slot))  # ranks 3..8, zero-padded to 8
    return bank


def _check_group(plan: LoraBatch, bank: LoraSlotBank, rows: torch.Tensor, layer: int, group: str,
                 gen: torch.Generator) -> None:  # fmt: skip
    a = bank.a[group][layer]
    fan_in = a.shape[2]
    x = torch.randn(len(rows), fan_in, generator=gen)
    outs = [(torch.randn(len(rows), bank.b[p].shape[2], generator=gen), bank.b[p][layer]) for p in GROUPS[group]]
    h = shrink_reference(x.double(), a.double(), rows)
    want = [y.double() + expand_reference(h[:, j * RANK : (j + 1) * RANK], b.double(), rows)
            for j, (y, b) in enumerate(outs)]  # fmt: skip
    base_rows = [y[rows == 0].clone() for y, _ in outs]
    plan.apply(x, a, outs, RANK)
    for (got, _), ref, untouched in zip(outs, want, base_rows, strict=True):
        torch.testing.assert_close(got.double(), ref, rtol=2e-5, atol=2e-5)
        assert torch.equal(got[rows == 0], untouched)  # rows without an adapter are never written


@needs_kernel
@pytest.mark.parametrize("idx", [
    [0, 3, 1, 3, 3, 0, 2],                 # base rows between adapter rows
    [5, 5, 5, 5, 5, 5, 5, 5, 5, 2, 2, 1],  # runs longer than the kernel's 4-row tile
    [6, 1, 6, 1, 4, 0, 0, 0, 2, 5, 3],     # every slot, unsorted
    [4, 0],
])  # fmt: skip
def test_native_plan_matches_the_reference_for_every_group(bank: LoraSlotBank, idx: list[int]) -> None:
    rows = torch.tensor(idx)
    plan = LoraBatch(rows, bank.storage)  # auto over a float32 CPU slot bank: the native kernel
    assert plan.mode == "native"
    gen = torch.Generator().manual_seed(len(idx))
    for layer in range(SHAPES.num_layers):
        for group in GROUPS:
            _check_group(plan, bank, rows, layer, group, gen)


@needs_kernel
def test_tensors_the_kernel_cannot_take_fall_back_to_pytorch(bank: LoraSlotBank) -> None:
    rows = torch.tensor([1, 2, 0, 2])
    plan = LoraBatch(rows, bank.storage)
    a, b = bank.a["o"][0], bank.b["o_proj"][0]
    x = torch.randn(4, 40)
    wide = torch.zeros(40, 4).T  # an output whose columns are not contiguous
    assert not plan._native.apply(x, a, [(wide, b)], RANK)
    plan.apply(x, a, [(wide, b)], RANK)  # the PyTorch plan for the same rows
    want = expand_reference(shrink_reference(x.double(), a.double(), rows), b.double(), rows)
    torch.testing.assert_close(wide.double(), want, rtol=2e-5, atol=2e-5)
    # autograd (co-training's delta) never goes through C
    xg = x.clone().requires_grad_()
    plan.delta(xg, a, b).sum().backward()
    assert xg.grad is not None and xg.grad[2].abs().sum() == 0  # the base row gets no LoRA gradient


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 9, 40])
def test_one_adapter_chunks_go_through_the_kernel_and_match_the_reference(bank: LoraSlotBank, rows: int,
                                                                           monkeypatch) -> None:  # fmt: skip
    plan = LoraBatch(torch.tensor([4]), bank.storage)  # a prefill chunk's plan: one slot, any number of rows
    assert plan.mode == "single" and plan._uniform is not None
    calls = []
    kernel_apply = native_lora.RowOrder.apply
    monkeypatch.setattr(native_lora.RowOrder, "apply", lambda *a, **k: calls.append(1) or kernel_apply(*a, **k))
    gen = torch.Generator().manual_seed(rows)
    for layer in range(SHAPES.num_layers):
        for group in GROUPS:
            _check_group(plan, bank, torch.full((rows,), 4), layer, group, gen)
    assert len(calls) == SHAPES.num_layers * len(GROUPS)


@needs_kernel
def test_one_adapter_chunks_above_the_work_limit_use_pytorch(bank: LoraSlotBank) -> None:
    a, b = bank.a["o"][1], bank.b["o_proj"][1]
    uniform = native_lora.UniformRows(3, capacity=16, max_macs=10 * (40 * RANK + RANK * 40))  # up to 10 rows
    for rows, taken in [(10, True), (11, False), (17, False)]:  # 17: beyond the capacity as well
        x, y = torch.randn(rows, 40), torch.zeros(rows, 40)
        assert uniform.apply(x, a, [(y, b)], RANK) is taken
        assert bool(y.abs().sum() > 0) is taken  # refused means untouched
    plan = LoraBatch(torch.tensor([3]), bank.storage)
    x, y = torch.randn(600, 40), torch.zeros(600, 40)  # far above the default limit: the PyTorch matmuls
    plan.apply(x, a, [(y, b)], RANK)
    want = expand_reference(shrink_reference(x.double(), a.double(), torch.full((600,), 3)), b.double(),
                            torch.full((600,), 3))  # fmt: skip
    torch.testing.assert_close(y.double(), want, rtol=2e-5, atol=2e-5)


@needs_kernel
def test_the_kernel_refuses_activations_with_too_few_rows(bank: LoraSlotBank) -> None:
    """Row indices go to C unchecked, so every activation must have a row for each: short ones are refused."""
    a, b = bank.a["o"][0], bank.b["o_proj"][0]
    order = native_lora.RowOrder([0, 2, 0, 5, 1])  # touches rows 1, 3 and 4
    assert not order.apply(torch.randn(4, 40), a, [(torch.zeros(5, 40), b)], RANK)
    assert not order.apply(torch.randn(5, 40), a, [(torch.zeros(4, 40), b)], RANK)
    assert not native_lora.UniformRows(2).apply(torch.randn(6, 40), a, [(torch.zeros(5, 40), b)], RANK)
    y = torch.zeros(5, 40)
    assert order.apply(torch.randn(5, 40), a, [(y, b)], RANK, key="layer0-o")  # a caller-given key for weights
    assert order.apply(torch.randn(5, 40), a, [(y, b)], RANK, key="layer0-o")  # ... reused on the next call
    assert y[0].abs().sum() == 0 and y[2].abs().sum() == 0 and y[1].abs().sum() > 0


@needs_kernel
@pytest.mark.parametrize("uniform", [False, True])
def test_threads_split_the_rows_and_change_no_result(bank: LoraSlotBank, uniform: bool) -> None:
    """Enough work per call for several threads (each row is computed by one thread, in the same order as on one
    thread, so the results are bitwise equal)."""
    gen = torch.Generator().manual_seed(7)
    rows = 301  # not a multiple of the tile or the thread count
    slots = [3] * rows if uniform else torch.randint(0, 7, (rows,), generator=gen).tolist()
    order = native_lora.UniformRows(3, capacity=rows, max_macs=2**40) if uniform else native_lora.RowOrder(slots)
    a, bs = bank.a["gate_up"][1], [bank.b[p][1] for p in GROUPS["gate_up"]]
    x = torch.randn(rows, a.shape[2], generator=gen)
    results = {}
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            ys = [torch.zeros(rows, b.shape[1]) for b in bs]
            assert order.apply(x, a, list(zip(ys, bs, strict=True)), RANK)
            results[threads] = ys
    finally:
        torch.set_num_threads(before)
    idx = torch.tensor(slots)
    h = shrink_reference(x.double(), a.double(), idx)
    for j, b in enumerate(bs):
        want = expand_reference(h[:, j * RANK : (j + 1) * RANK], b.double(), idx)
        torch.testing.assert_close(results[1][j].double(), want, rtol=2e-5, atol=2e-5)
        assert torch.equal(results[2][j], results[1][j]) and torch.equal(results[3][j], results[1][j])


def test_without_the_kernel_plans_use_the_pytorch_paths(bank: LoraSlotBank, monkeypatch) -> None:
    monkeypatch.setattr(native_lora, "available", lambda: False)
    assert LoraBatch(torch.tensor([1, 2, 3, 0]), bank.storage).mode == "gather"
    assert LoraBatch(torch.tensor([1, 2, 1, 2, 0, 0, 0]), bank.storage).mode == "grouped"
    float64 = LoraSlotBank(SHAPES, num_slots=2, max_rank=RANK, dtype=torch.float64)
    monkeypatch.undo()
    assert LoraBatch(torch.tensor([1, 2]), float64.storage).mode != "native"  # float32 only
    assert LoraBatch(torch.tensor([1, 2])).mode != "native"  # no slot bank (co-training): PyTorch


def test_a_build_failure_is_reported_with_the_compiler_message(tmp_path: Path, monkeypatch) -> None:
    if native_lora.compiler() is None:
        pytest.skip("no C compiler here")
    monkeypatch.setenv("LORAFLEET_KERNEL_CACHE", str(tmp_path / "cache"))
    broken = tmp_path / "broken.c"
    broken.write_text("int f(void) { return undefined_name; }\n")
    with pytest.raises(RuntimeError, match="undefined_name"):
        native_lora.build(broken)
    assert not list((tmp_path / "cache").glob("*.so"))  # nothing half-built left in the cache


@needs_kernel
def test_a_bad_slot_is_refused_when_the_plan_is_built_before_any_c_code_runs(bank: LoraSlotBank,
                                                                              monkeypatch) -> None:  # fmt: skip
    """The C code reads `a + slot * stride` unchecked: a slot the bank does not have never gets there. Plans over
    the slot bank check at construction; a plan that did not know the slot count checks when it first meets the
    weights (a slot of 10**12 would crash the process if it reached C)."""
    slots = bank.storage.shape[0]  # 7: slot 0 and six adapters
    with pytest.raises(IndexError, match=f"row 1: adapter slot {slots} is out of range"):
        LoraBatch(torch.tensor([1, slots, 0]), bank.storage)
    with pytest.raises(IndexError, match="row 2: adapter slot -1"):
        LoraBatch(torch.tensor([1, 2, -1]), bank.storage)
    with pytest.raises(IndexError):
        LoraBatch(torch.tensor([slots]), bank.storage)  # a one-adapter plan (the uniform rows) as well
    a, b = bank.a["o"][0], bank.b["o_proj"][0]
    y = torch.zeros(3, 40)
    for order in (native_lora.RowOrder([1, 10**12, 0]), native_lora.UniformRows(10**12, capacity=4)):
        with pytest.raises(IndexError, match="slot 1000000000000 is out of range for weights with 7 slots"):
            order.apply(torch.randn(3, 40), a, [(y, b)], RANK)
    assert not y.any()
    # checked once per plan and weights, not per call
    checks = []
    check = native_lora.check_slots
    monkeypatch.setattr(native_lora, "check_slots", lambda *args: checks.append(1) or check(*args))
    order = native_lora.RowOrder([2, 0, 6], num_slots=slots)
    for _ in range(5):
        assert order.apply(torch.randn(3, 40), a, [(y, b)], RANK, key="o0")
    assert len(checks) == 1


def _kernel_copy(tmp_path: Path, old: str, new: str) -> tuple[Path, ...]:
    """The kernel's sources copied to tmp_path with one edit (`old` -> `new` in the header)."""
    folder = tmp_path / "kernels"
    shutil.copytree(KERNELS, folder)
    header = folder / "bgmv_cpu.h"
    assert old in header.read_text()
    header.write_text(header.read_text().replace(old, new))
    return folder / "bgmv_cpu.c", folder / "side_worker.c"


@pytest.mark.parametrize("old,new,reason", [
    ("#define LF_ABI_VERSION 2", "#define LF_ABI_VERSION 3", "ABI version 3, this binding expects 2"),
    ("    int64_t out;\n} lf_output;", "    int64_t out;\n    int64_t added;\n} lf_output;",
     "struct layout differs.*lf_output: library 56, binding 48"),
    ("    int64_t x_row_stride;\n    int64_t in_features;", "    int64_t in_features;\n    int64_t x_row_stride;",
     "lf_call.in_features: library 8, binding 16"),
    ("#define MAX_R 1024", "#define MAX_R 2048", "MAX_R: library 2048, binding 1024"),
])  # fmt: skip
def test_the_loader_refuses_a_library_whose_abi_differs(tmp_path: Path, monkeypatch, old: str, new: str,
                                                        reason: str) -> None:  # fmt: skip
    if native_lora.compiler() is None:
        pytest.skip("no C compiler here")
    monkeypatch.setenv("LORAFLEET_KERNEL_CACHE", str(tmp_path / "cache"))
    library = native_lora.build(_kernel_copy(tmp_path, old, new), flags=["-O0"])
    with pytest.raises(native_lora.AbiMismatch, match=reason):
        native_lora.open_library(library)
    same = native_lora.build(_kernel_copy(tmp_path / "same", old, old), flags=["-O0"])
    assert native_lora.open_library(same).lf_abi_version() == native_lora.ABI_VERSION  # the unchanged copy loads
    # a prebuilt library named by $LORAFLEET_NATIVE_LORA_LIB is checked the same way: no kernel, and the reason
    monkeypatch.setenv("LORAFLEET_NATIVE_LORA_LIB", str(library))
    native_lora._load.cache_clear()
    try:
        assert not native_lora.available()
        assert re.search(reason, native_lora.unavailable_reason()) and str(library) in native_lora.unavailable_reason()
    finally:
        monkeypatch.undo()
        native_lora._load.cache_clear()


def test_a_library_without_the_abi_functions_is_refused(tmp_path: Path, monkeypatch) -> None:
    if native_lora.compiler() is None:
        pytest.skip("no C compiler here")
    monkeypatch.setenv("LORAFLEET_KERNEL_CACHE", str(tmp_path))
    old = tmp_path / "old.c"
    old.write_text("int lf_bgmv_f32_call(const void *c) { return c == 0; }\n")
    with pytest.raises(native_lora.AbiMismatch, match="no lf_abi_version"):
        native_lora.open_library(native_lora.build(old, flags=["-O0"]))


def test_no_compiler_means_no_kernel_and_a_reason(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LORAFLEET_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="no C compiler"):
        native_lora.build()


def test_require_names_what_is_wrong(monkeypatch) -> None:
    with pytest.raises(ValueError, match="CPU float32"):
        native_lora.require(torch.device("cpu"), torch.bfloat16)
    monkeypatch.setenv("LORAFLEET_NATIVE_LORA", "0")
    native_lora._load.cache_clear()
    try:
        assert not native_lora.available()
        with pytest.raises(RuntimeError, match="LORAFLEET_NATIVE_LORA"):
            native_lora.require(torch.device("cpu"), torch.float32)
    finally:
        monkeypatch.undo()
        native_lora._load.cache_clear()


@needs_kernel
def test_the_build_is_cached_and_reused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LORAFLEET_KERNEL_CACHE", str(tmp_path))
    first = native_lora.build()
    stamp = first.stat().st_mtime_ns
    assert native_lora.build() == first and first.stat().st_mtime_ns == stamp
    assert first.parent == tmp_path and first.suffix == ".so"


def test_an_engine_asked_for_the_native_kernel_without_it_refuses_to_start(tiny_base, monkeypatch) -> None:
    from serve_app.engine import EngineConfig, LoraEngine

    monkeypatch.setenv("LORAFLEET_NATIVE_LORA", "off")
    native_lora._load.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="lora_kernel 'native'.*LORAFLEET_NATIVE_LORA"):
            LoraEngine(tiny_base, EngineConfig(device="cpu", lora_kernel="native"))
        engine = LoraEngine(tiny_base, EngineConfig(device="cpu"))  # auto: runs on the PyTorch paths instead
        assert engine._lora_for((1, 2)).mode in ("gather", "grouped")
    finally:
        monkeypatch.undo()
        native_lora._load.cache_clear()


@needs_kernel
def test_the_engine_decodes_mixed_batches_through_the_kernel(tiny_base, tiny_shapes, tmp_path: Path,
                                                             monkeypatch) -> None:  # fmt: skip
    """Same requests through an engine on the native kernel (in place, and on the LoRA side thread) and one forced
    onto the PyTorch gather path: the same tokens; the native engines' mixed decode steps really ran natively, on
    the thread asked for, and the gather engine sent nothing to C."""
    from adapters.lora_side_thread import SideWorker
    from adapters.random_adapter import write_random_adapter
    from serve_app.engine import EngineConfig, LoraEngine, SamplingParams

    dirs = {f"n{i}": write_random_adapter(tmp_path / f"n{i}", tiny_shapes, rank=4 + 4 * (i % 3), seed=10 + i)
            for i in range(5)}  # fmt: skip
    outputs: dict[str, list[list[int]]] = {}
    calls: dict[str, list[int]] = {"apply": [], "start": []}
    for method, owner in (("apply", native_lora.RowOrder), ("start", SideWorker)):
        original = getattr(owner, method)
        monkeypatch.setattr(owner, method, lambda *a, _o=original, _m=method, **k: calls[_m].append(1) or _o(*a, **k))
    for kernel, overlap in (("auto", "off"), ("auto", "on"), ("gather", "auto")):
        for made in calls.values():
            made.clear()
        config = EngineConfig(device="cpu", max_running=8, max_loras=5, lora_kernel=kernel, lora_overlap=overlap)
        engine = LoraEngine(tiny_base, config)
        for name, folder in dirs.items():
            engine.register_adapter(name, folder)
        names = [None, *dirs]
        for i in range(12):
            ids = tiny_base.tokenizer(f"request {i}: say something about {i * 7}")["input_ids"]
            engine.add_request(f"r{i}", ids, SamplingParams(max_tokens=12, ignore_eos=True), names[i % len(names)])
        tokens: dict[str, list[int]] = {}
        modes = set()
        while engine.has_work():
            for out in engine.step():
                if out.token_id is not None:
                    tokens.setdefault(out.request_id, []).append(out.token_id)
            if engine._decode_plan is not None:
                modes.add(engine._decode_plan[1].mode)
        outputs[f"{kernel}/{overlap}"] = [tokens[f"r{i}"] for i in range(12)]
        assert ("native" in modes) == (kernel == "auto"), modes
        side = engine.runner.side
        assert (side is not None) == (overlap == "on")
        if overlap == "on":  # every C call went through the side thread
            assert calls["start"] and not calls["apply"] and side.calls == len(calls["start"])
        else:  # in place; forced gather: not even a prefill chunk goes to C
            assert not calls["start"] and bool(calls["apply"]) == (kernel == "auto")
    assert outputs["auto/off"] == outputs["gather/auto"] == outputs["auto/on"]
