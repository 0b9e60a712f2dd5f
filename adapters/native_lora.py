"""The native CPU batched-LoRA kernel (`adapters/kernels/bgmv_cpu.c`): build it once, load it, call it.

On CPU, PyTorch's batched matmul costs about 1 us per matrix whatever its size, so a decode step whose 64 rows use
32 adapters spends most of its LoRA time in per-matrix overhead (see bench/RESULTS.md). The C kernel does a whole
projection group (shrink, then every output's expand) for every row in one call, with no weight copies: it reads
each row's adapter straight from the slot bank. `batched_lora.LoraBatch` uses it for mixed CPU float32 batches
(mode `native`) when it is available, and falls back to the PyTorch paths when it is not.

Build: plain C (no Python or torch headers), compiled with the system C compiler (`$CC`, else `cc`/`gcc`) on first
use in about a second, cached under `~/.cache/lorafleet/kernels/` (`$LORAFLEET_KERNEL_CACHE`) by a hash of the
source, compiler and CPU model/features (it is built with `-march=native`, so a cache shared by different
machines keeps one build per CPU kind), and loaded with `ctypes`.
`LORAFLEET_NATIVE_LORA=0` turns it off. If no compiler is found or the build fails, `load()` returns None and says
why once in the log; nothing else changes.

    python -m adapters.native_lora        # build, then check the kernel against the per-row reference
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "kernels" / "bgmv_cpu.c"
MAX_OUTPUTS = 3  # outputs per call (q/k/v is the widest group); matches the C source
MAX_RANK_TOTAL = 1024  # k * r per call; matches MAX_R in the C source


class _Output(ctypes.Structure):
    _fields_ = [
        ("y", ctypes.c_void_p),
        ("y_row_stride", ctypes.c_int64),
        ("b", ctypes.c_void_p),
        ("b_slot_stride", ctypes.c_int64),
        ("b_row_stride", ctypes.c_int64),
        ("out", ctypes.c_int64),
    ]


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_fingerprint() -> str:
    """The CPU kind a `-march=native` build is for: machine, model name and feature flags."""
    parts = [os.uname().machine]
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part"):
                parts.append(line)
                if len(parts) > 4:
                    break
    except OSError:
        pass
    return "\n".join(parts)


def _cache_dir() -> Path:
    return Path(os.environ.get("LORAFLEET_KERNEL_CACHE") or Path.home() / ".cache" / "lorafleet" / "kernels")


def build(source: Path = SOURCE) -> Path:
    """Compile `source` into the cache (atomically; concurrent builders are harmless) and return the library."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found (set $CC, or install gcc)")
    key = hashlib.sha256(source.read_bytes() + compiler.encode() + _cpu_fingerprint().encode()).hexdigest()[:16]
    target = _cache_dir() / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = [compiler, "-O3", "-march=native", "-std=gnu11", "-shared", "-fPIC", "-o", str(out), str(source)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:  # a compiler without -march=native for this CPU: a portable build
            cmd.remove("-march=native")
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"'{' '.join(cmd)}' failed: {(done.stderr or done.stdout).strip()[-2000:]}")
        os.replace(out, target)
    return target


def load() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (disabled, no compiler, or the build failed; logged once)."""
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
    try:
        lib = ctypes.CDLL(str(build()))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        log.warning("native CPU LoRA kernel unavailable, using the PyTorch paths: %s", err)
        return None, f"the native CPU kernel could not be built or loaded: {err}"
    fn = lib.lf_bgmv_f32
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                   ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.POINTER(_Output),
                   ctypes.c_int64, ctypes.c_int64]  # fmt: skip
    return lib, None


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


def _activation_ok(t: torch.Tensor) -> bool:
    return t.dtype is torch.float32 and t.is_cpu and t.dim() == 2 and t.stride(1) == 1


class RowOrder:
    """The rows a native call touches (adapter rows only, sorted by slot so shared adapters are read once per run
    of rows), kept as int64 tensors whose addresses are passed to C. Per set of weights (a layer's projection
    group) the kernel's argument block is built and checked once, then reused: a call costs about 5 us of Python."""

    def __init__(self, slots: list[int]) -> None:
        order = sorted((s, row) for row, s in enumerate(slots) if s != 0)
        self.rows = torch.tensor([row for _, row in order], dtype=torch.int64)
        self.slots = torch.tensor([s for s, _ in order], dtype=torch.int64)
        self.count = len(order)
        self._rows_ptr, self._slots_ptr = self.rows.data_ptr(), self.slots.data_ptr()
        self._prepared: dict[tuple, tuple | None] = {}

    def apply(self, x: torch.Tensor, a: torch.Tensor, outputs: list[tuple[torch.Tensor, torch.Tensor]],
              rank: int) -> bool:  # fmt: skip
        """y += (x @ A[slot].T)[j-th rank block] @ B_j[slot].T for each listed row, in place (see the C source).
        `a` [S, R, in] and each `b` [S, out, r] as the slot bank lays them out, `x` [N, in] and each `y` [N, out]
        CPU float32 with contiguous rows. Returns False, having done nothing, for tensors the kernel cannot take."""
        key = (a.data_ptr(), rank, *[b.data_ptr() for _, b in outputs])  # (views at one address have one layout
        # in the slot bank; `_prepare` checked it)
        prepared = self._prepared.get(key, False)
        if prepared is False:
            prepared = self._prepared[key] = self._prepare(a, outputs, rank)
        if prepared is None or not _activation_ok(x) or x.shape[1] != a.shape[2]:
            return False
        structs, a_args = prepared
        for j, (y, b) in enumerate(outputs):
            if not _activation_ok(y) or y.shape[1] != b.shape[1]:
                return False
            structs[j].y, structs[j].y_row_stride = y.data_ptr(), y.stride(0)
        status = load().lf_bgmv_f32(x.data_ptr(), x.stride(0), x.shape[1], self._rows_ptr, self._slots_ptr,  # type: ignore[union-attr]
                                    self.count, *a_args, structs, len(outputs), rank)  # fmt: skip
        if status != 0:
            raise ValueError(f"native LoRA kernel refused the shapes (R={a.shape[1]}, outputs={len(outputs)})")
        return True

    @staticmethod
    def _prepare(a: torch.Tensor, outputs: list[tuple[torch.Tensor, torch.Tensor]], rank: int) -> tuple | None:
        if load() is None or not _weights_ok(a, outputs, rank):
            return None
        structs = (_Output * MAX_OUTPUTS)()
        for j, (_, b) in enumerate(outputs):
            structs[j].b, structs[j].b_slot_stride = b.data_ptr(), b.stride(0)
            structs[j].b_row_stride, structs[j].out = b.stride(2), b.shape[1]
        return structs, (a.data_ptr(), a.stride(0), a.stride(2), a.shape[1])


def _self_check(seed: int = 0) -> float:
    from adapters.batched_lora import expand_reference, shrink_reference

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
    print(f"kernel: {build()}")
    print(f"max relative error vs float64 reference: {_self_check():.2e}")
