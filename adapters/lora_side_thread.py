"""LoRA on a side thread, next to the base model's matmuls (CPU, native kernel).

A projection group's base matmuls (x @ W.T) and its LoRA (x @ A.T @ B.T) read the same input and meet only in
their sum. On a CPU replica the base's small matmuls at serving batch sizes run on one core, so the engine starts
the LoRA on a worker thread of the native kernel (`adapters/kernels/side_worker.c`) before the base matmuls, and adds
its result when they are done:

    worker.start(x, weights, plan.side_rows(n))   # the deltas of every adapter row go to scratch rows
    q, k, v = ...                                   # the base projections, on the calling thread meanwhile
    worker.finish((q, k, v))                        # rows the worker has not reached, then q[row] += delta[row]...

The worker spins briefly between calls and sleeps when the engine is idle. One worker per engine; one call in
flight at a time. Whether an engine uses it: `serve_app/engine/lora_overlap.py` (`engine.lora_overlap`).

    python -m adapters.lora_side_thread      # start a worker, check it against the in-place kernel
"""

from __future__ import annotations

import ctypes
from collections.abc import Hashable

import torch

from adapters import native_lora

_F32 = torch.float32


class SideWorker:
    """The native kernel's worker thread, its scratch rows, and the call in flight (whose tensors it keeps alive
    until the call is finished or waited for)."""

    def __init__(self) -> None:
        lib = native_lora.load()
        if lib is None:
            raise RuntimeError(f"LoRA side thread: {native_lora.unavailable_reason()}")
        self._lib = lib
        self._handle = lib.lf_worker_new()
        if not self._handle:
            raise RuntimeError("LoRA side thread: could not start the worker thread")
        self._start, self._finish, self._wait = lib.lf_worker_start, lib.lf_worker_finish, lib.lf_worker_wait
        self._scratch = torch.empty(0)
        self._scratch_address = self._scratch.data_ptr()
        # per weights key: the prepared call (see _bind); the call in flight and the tensors it reads
        self._bound: dict[Hashable, tuple | bool] = {}
        self._pending: tuple | None = None
        self._rows_needed = 0
        self._x = self._rows = None
        self.calls = 0

    def start(self, x: torch.Tensor, weights: tuple, rows: tuple) -> bool:
        """Start the deltas of a projection group's `weights` (A [S, R, in], [B_j [S, out_j, r]], rank r, key) for
        x's listed rows into scratch rows. `key`: a name the caller gives exactly these weights every time (the
        engine: its layer and group; None: made from the tensors). `rows`: from `native_lora.RowOrder.side_rows`
        (which rows, on which slots; a slot the weights do not have raises IndexError, before any C code runs).
        Returns False, having started nothing, for tensors the kernel cannot take or a call over the rows'
        multiply-add limit. The hot path of every forward: written for speed, but every
        check the C side relies on stays."""
        if self._pending is not None or not self._handle:
            self._not_idle()
        bound = self._bound.get(weights[3])
        if bound is None:
            a, bs, rank, key = weights
            if key is None:
                key = (a.data_ptr(), a.shape, rank, *[b.data_ptr() for b in bs])
                bound = self._bound.get(key)
            if bound is None:
                bound = self._bind(a, bs, rank, key)
        if bound is False:
            return False
        if rows[7] >= bound[12]:  # (the plan checked its slots when it was built; these weights may have fewer)
            native_lora.check_slots(rows[7], bound[6][0])
        n, rows_needed, max_macs = rows[2], rows[3], rows[4]
        if max_macs and n * bound[5] > max_macs:
            return False
        shape = x.shape
        if not (x.dtype is _F32 and len(shape) == 2 and shape[1] == bound[11] and shape[0] >= rows_needed and x.is_cpu
                and x.stride(1) == 1):  # fmt: skip
            return False
        width = bound[4]
        if self._scratch.numel() < rows_needed * width:
            self._scratch = torch.empty(max(rows_needed * width, 2 * self._scratch.numel()))
            self._scratch_address = self._scratch.data_ptr()
        aimed = bound[8]
        if aimed[0] != self._scratch_address:  # point the call's outputs at the scratch rows
            offset = 0
            for record, w in zip(bound[7], bound[3], strict=True):
                record.y = self._scratch_address + 4 * offset
                offset += w
            aimed[0] = self._scratch_address
        call = bound[1]
        if aimed[1] is not rows:  # (the calls of one forward share their rows)
            call.n, call.rows, call.slots = n, rows[5], rows[6]
            aimed[1] = rows
        call.x, call.x_row_stride = x.data_ptr(), x.stride(0)
        if self._start(self._handle, bound[2]) != 0:
            raise MemoryError("LoRA side thread: out of memory for the call's work list")
        self._pending, self._rows_needed, self._x, self._rows = bound, rows_needed, x, rows  # alive until finished
        self.calls += 1
        return True

    def _not_idle(self) -> None:
        if not self._handle:
            raise RuntimeError("LoRA side thread: the worker is closed")
        self.wait()  # the caller never finished the last call (an exception in between)

    def _bind(self, a: torch.Tensor, bs: list[torch.Tensor], rank: int, key: Hashable) -> tuple | bool:
        """Prepare (once per weights) (side-call struct, its call record, its address, output widths, their sum,
        multiply-adds per row, the weights (kept alive), the output records, [scratch address the records point
        at, rows the call is set for], target pointers, target strides, in_features, slot count), or False for
        weights the kernel cannot take."""
        found = native_lora.template(a, [(b, b) for b in bs], rank)
        bound: tuple | bool = False
        if found is not None:
            side = native_lora.SideCall()
            side.call = found
            call = side.call
            call.threads = 1
            widths = tuple(b.shape[1] for b in bs)
            records = [call.outputs[j] for j in range(len(bs))]
            for record in records:
                record.y_row_stride = sum(widths)  # scratch rows: the outputs side by side
            macs = a.shape[1] * a.shape[2] + rank * sum(widths)
            bound = (side, call, ctypes.addressof(side), widths, sum(widths), macs, (a, bs), records, [0, None],
                     side.target, side.target_row_stride, call.in_features, a.shape[0])  # fmt: skip
        self._bound[key] = bound
        return bound

    def finish(self, ys: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> None:
        """Wait for the call in flight and add its deltas to `ys` (one per output, in the call's order)."""
        bound, rows_needed = self._pending, self._rows_needed
        address, widths, targets, strides = bound[2], bound[3], bound[9], bound[10]  # type: ignore[index]
        j = 0
        for y in ys:  # the C side writes rows_needed rows of widths[j] floats at stride width through these
            if not (y.dtype is _F32 and y.is_contiguous() and y.is_cpu and y.dim() == 2 and y.size(1) == widths[j]
                    and y.size(0) >= rows_needed):  # fmt: skip
                break
            targets[j], strides[j] = y.data_ptr(), widths[j]
            j += 1
        if j == len(widths):
            status = self._finish(self._handle, address)
        else:  # outputs the C side cannot address (strided columns): add the scratch rows with PyTorch
            status = self._wait(self._handle)
            bad = [
                tuple(y.shape)
                for y, w in zip(ys, widths, strict=True)
                if y.dim() != 2 or y.shape[1] != w or y.shape[0] < rows_needed or y.dtype != _F32 or not y.is_cpu
            ]
            if bad:
                self._release()
                raise ValueError(f"LoRA side thread: outputs {bad} do not fit the call (widths {widths}, "
                                 f"{rows_needed} rows, CPU float32)")  # fmt: skip
            if status == 0:
                width = bound[4]  # type: ignore[index]
                deltas = self._scratch[: rows_needed * width].view(rows_needed, width)
                index = self._rows[0][: self._rows[2]]  # type: ignore[index]
                for y, delta in zip(ys, deltas.split(list(widths), dim=1), strict=True):
                    y.index_add_(0, index, delta.index_select(0, index))
        self._release()
        if status != 0:
            raise ValueError(f"native LoRA kernel refused the shapes (outputs={len(widths)})")

    def _release(self) -> None:
        self._pending = self._x = self._rows = None

    def wait(self) -> None:
        """Wait for the call in flight, if any, discarding its result."""
        if self._handle and self._pending is not None:
            self._wait(self._handle)
        self._release()

    def close(self) -> None:
        """Stop the thread (after the call in flight, if any)."""
        if self._handle:
            self._release()
            self._lib.lf_worker_free(self._handle)
            self._handle = None

    def __del__(self) -> None:
        self.close()


def _self_check(seed: int = 0) -> float:
    gen = torch.Generator().manual_seed(seed)
    slots, rank, fan_in, outs, rows = 6, 8, 40, (24, 8, 8), 13
    a = torch.randn(slots, fan_in, rank * 3, generator=gen).transpose(1, 2)
    bs = [torch.randn(slots, rank, o, generator=gen).transpose(1, 2) for o in outs]
    idx = torch.randint(0, slots, (rows,), generator=gen).tolist()
    x = torch.randn(rows, fan_in, generator=gen)
    ys = [torch.randn(rows, o, generator=gen) for o in outs]
    want = [y.clone() for y in ys]
    native_lora.RowOrder(idx).apply(x, a, list(zip(want, bs, strict=True)), rank)
    worker = SideWorker()
    try:
        assert native_lora.RowOrder(idx).start(worker, x, a, bs, rank), "kernel refused the tensors"
        worker.finish(ys)
    finally:
        worker.close()
    return max(float((y - w).abs().max() / w.abs().max()) for y, w in zip(ys, want, strict=True))


if __name__ == "__main__":
    print(f"max relative difference vs the in-place kernel: {_self_check():.2e}")
