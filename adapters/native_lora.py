"""The native CPU batched-LoRA kernel (`adapters/kernels/`): load it, check its ABI, call it (a pure binding).

On CPU, PyTorch's batched matmul costs about 1 us per matrix whatever its size, so a decode step whose 64 rows use
32 adapters spends most of its LoRA time in per-matrix overhead (see bench/RESULTS.md). The C kernel does a whole
projection group (shrink, then every output's expand) for every row in one call, with no weight copies: it reads
each row's adapter straight from the slot bank. `batched_lora.LoraBatch` uses it for mixed CPU float32 batches
(mode `native`) when it is available, and falls back to the PyTorch paths when it is not.

Threads: built with OpenMP where the compiler has it (linking libgomp, which resolves to the copy PyTorch has
already loaded, so both share one thread pool), a call with enough work (about 0.25 M multiply-adds) splits its rows
across `torch.get_num_threads()` threads; the split follows the one-thread tiling, so results are bitwise the same
for any thread count.

Build: `adapters.kernel_build` (on first use, cached per source, compiler and CPU kind; why not at install time:
see there). `$LORAFLEET_NATIVE_LORA_LIB` names a prebuilt library to load instead; `LORAFLEET_NATIVE_LORA=0` turns
the kernel off. Before its first call the loader compares the library's `lf_abi_version()` and `lf_layout()` (every
struct's size and field offsets, the buffer limits) with the ctypes mirror below, and refuses a library that
differs, naming what differs: the C side trusts every address and stride it is given. If no compiler is found, the
build fails or the ABI differs, `load()` returns None and says why once in the log; nothing else changes.

Safety: the C code reads `a + slot * stride` and `x + row * stride` unchecked, so every index is checked in Python
where it is made or first meets its weights: a `RowOrder`'s slots when the plan is built (>= 0, and below the slot
bank's slot count when the plan is given it), again against the weights' slot count when a plan is first bound to
a set of weights (once per plan and layer group, not per call); its rows are 0..N-1 by construction, and each call
checks that x and every output have that many rows.

    python -m adapters.native_lora        # build, then check the kernel against the per-row reference
"""

from __future__ import annotations

import ctypes
import logging
import os
import subprocess
from collections.abc import Hashable
from functools import cache
from pathlib import Path
from typing import Protocol

import torch

from adapters.kernel_build import build, compiler
from adapters.lora_reference import expand_reference, shrink_reference

log = logging.getLogger(__name__)

__all__ = ["build", "compiler", "load", "open_library", "available", "require", "RowOrder", "UniformRows"]

ABI_VERSION = 2  # LF_ABI_VERSION in bgmv_cpu.h
MAX_OUTPUTS = 3  # outputs per call (q/k/v is the widest group); MAX_OUTPUTS in the C source
MAX_RANK_TOTAL = 1024  # k * r per call; MAX_R in the C source


class AbiMismatch(RuntimeError):
    """The library's ABI version or struct layout is not the one this binding was written for."""


class _Output(ctypes.Structure):
    _fields_ = [
        ("y", ctypes.c_void_p),
        ("y_row_stride", ctypes.c_int64),
        ("b", ctypes.c_void_p),
        ("b_slot_stride", ctypes.c_int64),
        ("b_row_stride", ctypes.c_int64),
        ("out", ctypes.c_int64),
    ]


class _Call(ctypes.Structure):
    """`lf_call` in the C source: every argument of one kernel call."""

    _fields_ = [
        ("x", ctypes.c_void_p),
        ("x_row_stride", ctypes.c_int64),
        ("in_features", ctypes.c_int64),
        ("rows", ctypes.c_void_p),
        ("slots", ctypes.c_void_p),
        ("n", ctypes.c_int64),
        ("a", ctypes.c_void_p),
        ("a_slot_stride", ctypes.c_int64),
        ("a_row_stride", ctypes.c_int64),
        ("big_r", ctypes.c_int64),
        ("k", ctypes.c_int64),
        ("r", ctypes.c_int64),
        ("threads", ctypes.c_int64),
        ("outputs", _Output * MAX_OUTPUTS),
    ]


class SideCall(ctypes.Structure):
    """`lf_side_call` in the C source: a call whose expands store into scratch rows, and the outputs that
    `lf_worker_finish` adds them to."""

    _fields_ = [
        ("call", _Call),
        ("target", ctypes.c_void_p * MAX_OUTPUTS),
        ("target_row_stride", ctypes.c_int64 * MAX_OUTPUTS),
    ]


def expected_layout() -> dict[str, int]:
    """What `lf_layout()` must report: each mirrored struct's size and field offsets (bytes), and the limits."""
    layout: dict[str, int] = {}
    for c_name, struct in (("lf_output", _Output), ("lf_call", _Call), ("lf_side_call", SideCall)):
        layout[c_name] = ctypes.sizeof(struct)
        for field, *_ in struct._fields_:
            layout[f"{c_name}.{field}"] = getattr(struct, field).offset
    return layout | {"MAX_OUTPUTS": MAX_OUTPUTS, "MAX_R": MAX_RANK_TOTAL}


def open_library(path: Path | str) -> ctypes.CDLL:
    """Load the kernel library at `path`, check its ABI against this binding and declare its functions. Raises
    AbiMismatch (naming the file and what differs), or OSError if it cannot be loaded."""
    lib = ctypes.CDLL(str(path))
    for name in ("lf_abi_version", "lf_layout"):
        if not hasattr(lib, name):
            raise AbiMismatch(f"{path}: no {name}() (built from older sources than this binding)")
    lib.lf_abi_version.restype, lib.lf_abi_version.argtypes = ctypes.c_int64, []
    version = lib.lf_abi_version()
    if version != ABI_VERSION:
        raise AbiMismatch(f"{path}: ABI version {version}, this binding expects {ABI_VERSION}")
    lib.lf_layout.restype, lib.lf_layout.argtypes = ctypes.c_int64, [ctypes.c_char_p, ctypes.c_int64]
    size = lib.lf_layout(None, 0) + 1
    text = ctypes.create_string_buffer(size)
    lib.lf_layout(text, size)
    try:
        found = {k: int(v) for k, v in (item.split("=") for item in text.value.decode().split())}
    except ValueError as err:
        raise AbiMismatch(f"{path}: unreadable lf_layout() {text.value[:200]!r}") from err
    want = expected_layout()
    if found != want:
        diff = [f"{k}: library {found.get(k, 'absent')}, binding {want.get(k, 'absent')}"
                for k in sorted(set(found) | set(want)) if found.get(k) != want.get(k)]  # fmt: skip
        raise AbiMismatch(f"{path}: struct layout differs from the ctypes mirror ({'; '.join(diff[:6])})")
    for name in ("lf_bgmv_f32_call", "lf_worker_wait", "lf_worker_start", "lf_worker_finish"):
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p] * (1 if name in ("lf_bgmv_f32_call", "lf_worker_wait") else 2)
    lib.lf_worker_new.restype = ctypes.c_void_p
    lib.lf_worker_new.argtypes = []
    lib.lf_worker_free.restype = None
    lib.lf_worker_free.argtypes = [ctypes.c_void_p]
    return lib


def load() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (disabled, no compiler, the build failed, ABI mismatch; logged once)."""
    return _load()[0]


def unavailable_reason() -> str | None:
    return _load()[1]


def require(device: torch.device, dtype: torch.dtype) -> None:
    """Raise with the reason if `lora_kernel: native` cannot run for an engine on this device and dtype."""
    if device.type != "cpu" or dtype != torch.float32:
        raise ValueError(f"lora_kernel 'native' is the CPU float32 kernel; this engine runs {dtype} on {device}")
    if not available():
        raise RuntimeError(f"lora_kernel 'native': {unavailable_reason()}")


@cache
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    if os.environ.get("LORAFLEET_NATIVE_LORA", "1").strip().lower() in ("0", "false", "no", "off"):
        return None, "turned off by LORAFLEET_NATIVE_LORA"
    prebuilt = os.environ.get("LORAFLEET_NATIVE_LORA_LIB")
    try:
        return open_library(prebuilt or build()), None
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        log.warning("native CPU LoRA kernel unavailable, using the PyTorch paths: %s", err)
        return None, f"the native CPU kernel could not be built or loaded: {err}"


def available() -> bool:
    return load() is not None


def _weights_ok(a: torch.Tensor, outputs: list[tuple[torch.Tensor, torch.Tensor]], rank: int) -> bool:
    """CPU float32 weights with the R/out dimension contiguous (the slot bank's layout), within the kernel's fixed
    buffers."""
    tensors = [a] + [b for _, b in outputs]
    return (
        all(t.device.type == "cpu" and t.dtype == torch.float32 and t.dim() == 3 and t.stride(1) == 1 for t in tensors)
        and 0 < len(outputs) <= MAX_OUTPUTS
        and a.shape[1] <= MAX_RANK_TOTAL
        and rank * len(outputs) <= a.shape[1]
        and all(b.shape[0] == a.shape[0] and b.shape[2] == rank for _, b in outputs)
    )


# a weight layout (the group's A and Bs: addresses, shapes, strides; rank) -> a _Call with the weight fields set,
# or None if the kernel cannot take those weights. Checked and built once per layout, copied for each RowOrder.
_templates: dict[tuple, _Call | None] = {}
_MAX_TEMPLATES = 4096


def template(a: torch.Tensor, outputs: list[tuple[torch.Tensor, torch.Tensor]], rank: int) -> _Call | None:
    key = (a.data_ptr(), a.dtype, a.device, a.shape, a.stride(), rank,
           *[(b.data_ptr(), b.dtype, b.device, b.shape, b.stride()) for _, b in outputs])  # fmt: skip
    if key in _templates:
        return _templates[key]
    if len(_templates) >= _MAX_TEMPLATES:
        _templates.clear()
    call = None
    if load() is not None and _weights_ok(a, outputs, rank):
        call = _Call(a=a.data_ptr(), a_slot_stride=a.stride(0), a_row_stride=a.stride(2), big_r=a.shape[1],
                     in_features=a.shape[2], k=len(outputs), r=rank)  # fmt: skip
        for j, (_, b) in enumerate(outputs):
            o = call.outputs[j]
            o.b, o.b_slot_stride, o.b_row_stride, o.out = b.data_ptr(), b.stride(0), b.stride(2), b.shape[1]
    _templates[key] = call
    return call


class RowOrder:
    """The rows a native call touches (adapter rows only, sorted by slot so shared adapters are read once per run
    of rows), kept as int64 tensors whose addresses are passed to C. Per set of weights (a layer's projection
    group) the kernel's argument struct is made once from the layout's template, then only the activation
    pointers change: a call costs a few us of Python."""

    def __init__(self, slots: list[int], num_slots: int | None = None) -> None:
        """`slots`: one slot per row (0 = no adapter). `num_slots`: the slot bank's slot count (slot 0 included),
        if known here; every slot is checked against it now, and against the weights' slot count when the plan
        first meets them. Raises IndexError naming the first bad row."""
        order = sorted((s, row) for row, s in enumerate(slots) if s != 0)
        self.max_slot = order[-1][0] if order else 0
        if order and (order[0][0] < 0 or (num_slots is not None and self.max_slot >= num_slots)):
            bad, row = order[0] if order[0][0] < 0 else order[-1]
            raise IndexError(f"row {row}: adapter slot {bad} is out of range (slots 0..{(num_slots or 1) - 1})"
                             if num_slots is not None else f"row {row}: adapter slot {bad} is negative")  # fmt: skip
        self.rows = torch.tensor([row for _, row in order], dtype=torch.int64)  # 0..N-1 by construction
        self.slots = torch.tensor([s for s, _ in order], dtype=torch.int64)
        self.count = len(order)
        self.max_row = max((row for _, row in order), default=-1)  # x and every y need more rows than this
        self.uniform = False
        self.max_macs = 0
        # (address and shape of A, rank, addresses of the Bs), or the caller's key -> (call struct, its address, the
        # kernel, output widths, multiply-adds per row), or None for weights the kernel cannot take (in the slot
        # bank, a view's address and shape fix its layout)
        self._bound: dict[tuple, tuple | None] = {}
        self._side_rows = (self.rows, self.slots, self.count, self.max_row + 1, 0, self.rows.data_ptr(),
                           self.slots.data_ptr(), self.max_slot)  # fmt: skip

    def apply(self, x: torch.Tensor, a: torch.Tensor, outputs: list[tuple[torch.Tensor, torch.Tensor]], rank: int,
              key: Hashable | None = None) -> bool:  # fmt: skip
        """y += (x @ A[slot].T)[j-th rank block] @ B_j[slot].T for each listed row, in place (see the C source).
        `a` [S, R, in] and each `b` [S, out, r] as the slot bank lays them out, `x` [N, in] and each `y` [N, out]
        CPU float32 with contiguous rows. Returns False, having done nothing, for tensors the kernel cannot take.
        `key`: a name the caller gives exactly this (a, bs, rank) every time (the engine: its layer and group), which
        spares computing one from the tensors. This is the hot path of every decode step: its checks are ordered
        and written for speed, but every one of them stays (the C side trusts them)."""
        if key is None:
            key = (a.data_ptr(), a.shape, rank, *[b.data_ptr() for _, b in outputs])
        bound = self._bound.get(key, False)
        if bound is False:
            bound = self._bound[key] = self._bind(a, outputs, rank)
        if bound is None:
            return False
        call, address, kernel, widths, macs_per_row = bound
        n = x.shape[0]
        if self.uniform:  # rows 0..n-1, n from x: every y needs n rows
            if n > self.count or n * macs_per_row > self.max_macs:
                return False
            call.n = rows_needed = n
        else:
            rows_needed = self.max_row + 1
        if not _fits(x, call.in_features, rows_needed):
            return False
        for (y, _), width in zip(outputs, widths, strict=True):
            if not _fits(y, width, rows_needed):
                return False
        for slot, (y, _) in zip(call.outputs, outputs, strict=False):  # (the struct has MAX_OUTPUTS slots)
            slot.y, slot.y_row_stride = y.data_ptr(), y.stride(0)
        call.x, call.x_row_stride = x.data_ptr(), x.stride(0)
        call.threads = torch.get_num_threads()
        if kernel(address) != 0:
            raise ValueError(f"native LoRA kernel refused the shapes (R={a.shape[1]}, outputs={len(outputs)})")
        return True

    def side_rows(self, x_rows: int) -> tuple | None:
        """What `SideWorker.start` needs to know of these rows for an x of `x_rows` rows: (rows, slots, n,
        rows x and every output need, multiply-add limit or 0, rows' address, slots' address, highest slot); None
        if the plan cannot take that x. Made once per forward, shared by its calls."""
        if not self.uniform:
            return self._side_rows
        if x_rows > self.count:
            return None
        return (self.rows, self.slots, x_rows, x_rows, self.max_macs, self._side_rows[5], self._side_rows[6],
                self.max_slot)  # fmt: skip

    def start(self, worker: _Starter, x: torch.Tensor, a: torch.Tensor, bs: list[torch.Tensor], rank: int,
              key: Hashable | None = None) -> bool:  # fmt: skip
        """Start the LoRA of `x` for these rows on `worker`'s thread (see `lora_side_thread`): the deltas go to
        scratch rows, and `worker.finish(ys)` adds them to the outputs once the caller has made them. Returns
        False, having started nothing, where `apply` would refuse the tensors. `key` as for `apply`."""
        rows = self.side_rows(x.shape[0])
        return rows is not None and worker.start(x, (a, bs, rank, key), rows)

    def _bind(self, a: torch.Tensor, outputs: list[tuple[torch.Tensor, torch.Tensor]], rank: int) -> tuple | None:
        found = template(a, outputs, rank)
        if found is None:
            return None
        check_slots(self.max_slot, a)
        call = _Call.from_buffer_copy(found)
        call.rows, call.slots, call.n = self.rows.data_ptr(), self.slots.data_ptr(), self.count
        kernel = load().lf_bgmv_f32_call  # type: ignore[union-attr]
        widths = tuple(b.shape[1] for _, b in outputs)
        return call, ctypes.addressof(call), kernel, widths, a.shape[1] * a.shape[2] + rank * sum(widths)


def check_slots(max_slot: int, a: torch.Tensor) -> None:
    """Raise IndexError unless slot `max_slot` exists in weights `a` [S, ...] (whose Bs `template` checked to have
    as many slots): before any C code reads `a + slot * stride`."""
    if max_slot >= a.shape[0]:
        raise IndexError(f"adapter slot {max_slot} is out of range for weights with {a.shape[0]} slots")


class _Starter(Protocol):
    """What `RowOrder.start` hands a call to (`lora_side_thread.SideWorker`; named here without importing it)."""

    def start(self, x: torch.Tensor, weights: tuple, rows: tuple) -> bool: ...


def _fits(t: torch.Tensor, width: int, rows: int) -> bool:
    """CPU float32 [N >= rows, width] with contiguous rows."""
    shape = t.shape
    return (t.dtype is torch.float32 and len(shape) == 2 and shape[1] == width and shape[0] >= rows and t.is_cpu
            and t.stride(1) == 1)  # fmt: skip


# a one-adapter chunk goes to the kernel up to this many multiply-adds per call (shrink + expands); beyond it
# PyTorch's GEMM is faster. Measured crossover on a 2-core EPYC VM: 0.5-0.7 M for hidden 64 and 576 alike.
UNIFORM_MAX_MACS = 512 * 1024


class UniformRows(RowOrder):
    """Rows 0..N-1 all on one slot (a prefill chunk, or a batch on one adapter), N taken from x at each call, up to
    `capacity` rows. For small chunks the kernel's one call beats PyTorch's four or five small matmuls (their
    per-call cost dominates); `apply` returns False (the caller uses PyTorch) above `max_macs` work per call."""

    def __init__(self, slot: int, capacity: int = 256, max_macs: int = UNIFORM_MAX_MACS,
                 num_slots: int | None = None) -> None:  # fmt: skip
        if slot < 1:
            raise ValueError("UniformRows needs an adapter slot (>= 1)")
        super().__init__([slot] * capacity, num_slots)
        self.uniform = True
        self.max_macs = max_macs


def _self_check(seed: int = 0) -> float:
    gen = torch.Generator().manual_seed(seed)
    slots, rank, fan_in, outs, rows = 6, 8, 40, (24, 8, 8), 13
    a = torch.randn(slots, fan_in, rank * 3, generator=gen).transpose(1, 2)  # [S, R, in], R contiguous
    bs = [torch.randn(slots, rank, o, generator=gen).transpose(1, 2) for o in outs]  # [S, out, r]
    idx = torch.randint(0, slots, (rows,), generator=gen)
    x = torch.randn(rows, fan_in, generator=gen)
    got = [torch.zeros(rows, o) for o in outs]
    assert RowOrder(idx.tolist()).apply(x, a, list(zip(got, bs, strict=True)), rank), "kernel refused the tensors"
    h = shrink_reference(x.double(), a.double(), idx)
    h[idx == 0] = 0
    worst = 0.0
    for j, (y, b) in enumerate(zip(got, bs, strict=True)):
        want = expand_reference(h[:, j * rank : (j + 1) * rank], b.double(), idx)
        worst = max(worst, float((y.double() - want).abs().max() / want.abs().max()))
    return worst


if __name__ == "__main__":
    if load() is None:
        raise SystemExit(f"no kernel: {unavailable_reason()}")
    print(f"kernel: {os.environ.get('LORAFLEET_NATIVE_LORA_LIB') or build()}")
    print(f"max relative error vs float64 reference: {_self_check():.2e}")
