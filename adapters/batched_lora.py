"""The batched-LoRA operator: one forward for a batch whose rows use different adapters.

Adapter weights sit in stacked slot tensors (see `slot_bank`): A as [S, R, in] and B as [S, out, r], slot 0 all
zeros (rows without an adapter). Each row carries a slot index. The operator is the punica/S-LoRA pair:

    shrink:  h[n]  = x[n] @ A[idx[n]].T          (N, in)  -> (N, R)
    expand:  y[n] += h[n] @ B[idx[n]].T          (N, r)   -> (N, out)   (the LoRA scale is folded into B)

`LoraBatch` is the plan for one step's rows. It picks the cheapest correct path:
  - `none`:    no row uses an adapter: nothing to do;
  - `single`:  every row uses the same slot (a prefill chunk, or a batch of one adapter): two plain matmuls, or
    for small chunks on CPU float32 one call of the native kernel (`native_lora.UniformRows`);
  - `gather`:  each row's weights copied next to it (`index_select`), then one `bmm`/`baddbmm_` per matrix over
    the rows, in place. Fewest operations per step; best when (nearly) every row has its own adapter, but it
    reads and copies rows x adapter size. With the slot bank's `storage` the copy is one `index_select` for every
    layer at once, made when the plan is first used; the next plan takes the buffer over and re-copies only the
    rows whose slot changed (continuous batching changes rows only when a request joins or leaves);
  - `native`:  CPU float32 over the slot bank: the C kernel in `native_lora` does shrink and every expand of a
    projection group for all rows in one call, reading each row's adapter in place (PyTorch's CPU `bmm` costs
    about 1 us per matrix, which dominates these tiny per-row matmuls). `auto` picks it whenever it can run;
  - `grouped`: rows scattered into an [adapters, m, in] block (m = most rows of one adapter) and one `bmm` per
    matrix straight over the slot tensors, no weight copy: every adapter is read once per step however many rows
    use it, and its deltas are added back with `index_add_`. A few more operations than `gather`, half or less of
    its memory traffic as soon as rows share adapters; and no per-row copies, which for big adapters would not
    stay cheap. Unless the batch is so skewed that padding every adapter to m rows multiplies mostly zeros.
  - `triton`:  the Triton SGMV/BGMV kernels of `triton_lora` (segments of one adapter / per-row adapters), read
    each row's adapter in place; `auto` picks them on CUDA for mixed batches when triton imports
    (`triton_runtime`). Forced, they also run one-adapter plans (one SGMV segment); on CPU only under the Triton
    interpreter (tests).
`lora_modes.choose_mode` picks between gather and grouped; `EngineConfig.lora_kernel` can force any path.
`lora_reference.shrink_reference` / `expand_reference` are the float64-checkable oracle for every path.

    python -m adapters.batched_lora        # self-check: every path against the per-row reference
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable
from typing import Any

import torch

from adapters import lora_modes, native_lora, triton_runtime
from adapters.lora_modes import Kernel, Mode, choose_mode, native_runs, slot_count, triton_runs
from adapters.lora_reference import expand_reference, shrink_reference


class LoraBatch:
    """The per-row slot indices of one forward, and how to apply LoRA to them.

    `idx` holds one slot per row (0 = no adapter). Build one per composition of rows and reuse it while the rows
    do not change: gathered weights and scatter buffers are cached on the plan. `storage` is the slot bank's
    [S, F] buffer when the weights are views of it (one gather for all layers; also sizes `auto`'s choice).
    `slots`: idx as a host list, if the caller has it (saves a device-to-host copy of idx on CUDA).
    `previous`: the plan this one replaces, if no slot's contents changed since it was built; a gather then takes
    over its buffer and copies only the rows whose slot changed (`previous` is released: do not use it again).
    A `single` plan applies to any number of rows (it only needs the slot), so callers may keep one per slot.
    """

    def __init__(self, idx: torch.Tensor, storage: torch.Tensor | None = None, kernel: Kernel | str = "auto",
                 cache_gathers: bool = True, previous: LoraBatch | None = None,
                 slots: list[int] | None = None) -> None:  # fmt: skip
        self.idx = idx
        self.rows = int(idx.shape[0])
        slots = idx.tolist() if slots is None else list(slots)  # (the caller's copy of idx: no device sync)
        self._slot_list: list[int] = slots
        counts = Counter(slots)
        present = sorted(counts)
        self.distinct = [s for s in present if s != 0]
        self._storage = storage
        self._cache_gathers = cache_gathers
        self._gathered: dict[tuple[int, torch.Size], torch.Tensor] = {}
        self._rows_flat: torch.Tensor | None = None  # [N, F] view of _rows_buffer [capacity, F]
        self._rows_buffer: torch.Tensor | None = None
        self._previous = previous if previous is not None and previous._storage is storage else None
        self._buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # width -> (flat, [span, m, width] view)
        self._lo, self._span, self._m = 0, 0, 0
        if not self.distinct:
            self.mode: Mode = "none"
        elif len(present) == 1:
            self.mode = "single"
            self.slot = self.distinct[0]
            # small one-adapter chunks: one native call instead of a shrink and k expands (None: PyTorch only)
            self._uniform = (native_lora.UniformRows(self.slot, num_slots=slot_count(storage))
                             if native_runs(kernel, idx, storage) else None)  # fmt: skip
        else:
            self._lo = self.distinct[0]  # the grouped window: adapter slots lo..hi (base rows need no LoRA)
            self._span = self.distinct[-1] - self._lo + 1
            self._m = max(counts[s] for s in self.distinct)
            if kernel in ("gather", "grouped"):
                self.mode = kernel  # type: ignore[assignment]
            else:
                slot_bytes = storage.shape[1] * storage.element_size() if storage is not None else None
                adapter_rows = self.rows - counts.get(0, 0)
                self.mode = choose_mode(self.rows, adapter_rows, len(self.distinct), self._span * self._m, slot_bytes)
                if native_runs(kernel, idx, storage):
                    self._torch_mode: Mode = self.mode  # what a fallback (unsupported tensors, autograd) uses
                    self.mode = "native"
                    self._native = native_lora.RowOrder(slots, slot_count(storage))  # (IndexError: a bad slot)
                    self._fallback_plan: LoraBatch | None = None
            if self.mode == "grouped" and not triton_runs(kernel, idx):
                self._grouped_positions(slots)
        if self.mode != "none" and triton_runs(kernel, idx, self.mode):
            self._torch_mode, self.mode = self.mode, "triton"  # (the PyTorch plan: autograd, `delta`)
            self._triton = triton_runtime.load().TritonRows(slots, idx.device)  # type: ignore[union-attr]
            self._fallback_plan = None
        if self.mode != "gather":
            self._previous = None  # (nothing to take over; and no chain of old plans kept alive)

    @property
    def active(self) -> bool:
        return self.mode != "none"

    def _fallback(self) -> LoraBatch:
        """native mode: the PyTorch plan for the same rows (tensors the kernel cannot take; autograd)."""
        if self._fallback_plan is None:
            self._fallback_plan = LoraBatch(self.idx, self._storage, self._torch_mode, self._cache_gathers,
                                            slots=self._slot_list)  # fmt: skip
        return self._fallback_plan

    def _slot_t(self, weights: torch.Tensor) -> torch.Tensor:
        """single: weights[slot].T (a cached view; contiguous for the slot bank's tensors)."""
        key = (weights.data_ptr(), weights.shape)
        hit = self._gathered.get(key)
        if hit is None:
            hit = self._gathered[key] = weights[self.slot].T
        return hit

    # -- gather: per-row copies of the weights -----------------------------------------------------------------
    def _rows_t(self, weights: torch.Tensor) -> torch.Tensor:
        """weights [S, rows, cols] -> the batch rows' copies, transposed for bmm: [N, cols, rows]. With the slot
        bank's storage this is a view of the one all-layer gather (and contiguous per matrix: the bank stores
        each matrix transposed)."""
        key = (weights.data_ptr(), weights.shape)  # stable for a view of a slot tensor (id() is not)
        hit = self._gathered.get(key)
        if hit is not None:
            return hit
        flat = self._flat_rows(weights)
        if flat is not None:
            offset = weights.storage_offset() - self._storage.storage_offset()  # type: ignore[union-attr]
            gathered = flat.as_strided((self.rows, *weights.shape[1:]), (flat.stride(0), *weights.stride()[1:]),
                                       flat.storage_offset() + offset)  # fmt: skip
        else:
            gathered = weights.index_select(0, self.idx)
        gathered = gathered.transpose(1, 2)
        if self._cache_gathers:
            self._gathered[key] = gathered
        return gathered

    def _flat_rows(self, weights: torch.Tensor) -> torch.Tensor | None:
        storage = self._storage
        if (storage is None or weights.stride(0) != storage.stride(0)
                or weights.untyped_storage().data_ptr() != storage.untyped_storage().data_ptr()):  # fmt: skip
            return None
        if self._rows_flat is None:
            self._rows_flat = self._gather_rows(storage)
        return self._rows_flat

    def _gather_rows(self, storage: torch.Tensor) -> torch.Tensor:
        """storage[idx] as [N, F]: in the previous plan's buffer, copying only changed rows, if it has room;
        otherwise in a new buffer with room for the batch to grow (within the gather budget)."""
        previous, self._previous = self._previous, None
        old = previous._rows_buffer if previous is not None else None
        if previous is not None and old is not None and old.shape[0] >= self.rows:
            before = previous._slot_list
            previous.release()
            changed = [i for i, s in enumerate(self._slot_list) if i >= len(before) or before[i] != s]
            if changed:
                rows = torch.tensor(changed, device=self.idx.device)
                old.index_copy_(0, rows, storage.index_select(0, self.idx.index_select(0, rows)))
            self._rows_buffer = old
            return old[: self.rows]
        room = max(self.rows, lora_modes.GATHER_BUDGET_BYTES // max(1, storage.shape[1] * storage.element_size()))
        buffer = storage.new_empty(min(2 * self.rows, room), storage.shape[1])
        torch.index_select(storage, 0, self.idx, out=buffer[: self.rows])
        self._rows_buffer = buffer
        return buffer[: self.rows]

    # -- grouped: rows scattered per adapter, weights read in place --------------------------------------------
    def _grouped_positions(self, slots: list[int]) -> None:
        """An adapter row goes to position (slot - lo) * m + (its rank among its slot's rows) of the padded block,
        a base row to a scratch position past the block (never multiplied). `_row_of` maps each block position
        back to its row: padding maps to row 0 and only ever adds exact zeros (its input stays zero)."""
        block = self._span * self._m
        seen: dict[int, int] = {}
        positions = []
        row_of = [0] * block
        scratch = block
        for row, slot in enumerate(slots):
            if slot == 0:
                positions.append(scratch)
                scratch += 1
                continue
            k = seen.get(slot, 0)
            seen[slot] = k + 1
            positions.append((slot - self._lo) * self._m + k)
            row_of[positions[-1]] = row
        self._scratch = scratch - block
        # rows already sorted by adapter with equal counts (co-training's batches): the scatter is a plain view
        self._contiguous = block == len(slots) and positions == list(range(len(slots)))
        self._pos = torch.tensor(positions, device=self.idx.device)
        self._row_of = torch.tensor(row_of, device=self.idx.device)

    def _scatter(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, in] -> [span, m, in]; padding stays zero, so padded positions yield zero deltas."""
        width = x.shape[1]
        buffers = self._buffers.get(width)
        if buffers is None or buffers[0].dtype != x.dtype:
            flat = x.new_zeros(self._span * self._m + self._scratch, width)
            buffers = self._buffers[width] = (flat, flat[: self._span * self._m].view(self._span, self._m, width))
        buffers[0].index_copy_(0, self._pos, x)
        return buffers[1]

    def _window(self, weights: torch.Tensor) -> torch.Tensor:
        """The slots lo..hi of weights [S, rows, cols], transposed for bmm: [span, cols, rows] (a cached view)."""
        key = (weights.data_ptr(), weights.shape)
        hit = self._gathered.get(key)
        if hit is None:
            hit = weights[self._lo : self._lo + self._span].transpose(1, 2)
            self._gathered[key] = hit
        return hit

    def _expand_grouped(self, y: torch.Tensor, h: torch.Tensor, b: torch.Tensor) -> None:
        """y [N, out] += the padded deltas h [span, m, r] @ window(b), added back row by row."""
        delta = torch.bmm(h, self._window(b))
        y.index_add_(0, self._row_of, delta.view(self._span * self._m, -1))

    # -- the operator --------------------------------------------------------------------------------------------
    def shrink(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """x [N, in], a [S, R, in] -> h [N, R]."""
        if self.mode == "triton":
            return self._triton.shrink(x, a).to(x.dtype)
        if self.mode == "native":
            return self._fallback().shrink(x, a)
        if self.mode == "single":
            return x @ a[self.slot].T
        if self.mode == "grouped":
            h = torch.bmm(self._scatter(x), self._window(a)).view(self._span * self._m, -1)
            h = torch.cat([h, h.new_zeros(self._scratch, h.shape[1])])  # base rows: h = 0
            return h.index_select(0, self._pos)
        return torch.bmm(x.unsqueeze(1), self._rows_t(a)).squeeze(1)

    def expand_add(self, y: torch.Tensor, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """y [N, out] += h [N, r] @ b[idx].T; returns y."""
        if self.mode == "triton":
            return self._triton.expand_add(y, h, b)
        if self.mode == "native":
            return self._fallback().expand_add(y, h, b)
        if self.mode == "single":
            return y.addmm_(h, b[self.slot].T)
        if self.mode == "grouped":
            self._expand_grouped(y, self._scatter(h), b)
            return y
        y.unsqueeze(1).baddbmm_(h.unsqueeze(1), self._rows_t(b))
        return y

    def apply(self, x: torch.Tensor, a: torch.Tensor, outputs: list[tuple[torch.Tensor, torch.Tensor]], rank: int,
              key: Hashable | None = None) -> None:  # fmt: skip
        """Shrink once for every projection that shares input `x`, then expand into each output in place. `key`:
        optionally, a name the caller always gives these weights (see `native_lora.RowOrder.apply`)."""
        mode = self.mode
        if mode == "triton":
            self._triton.apply(x, a, outputs, rank)
        elif mode == "native":
            if not self._native.apply(x, a, outputs, rank, key):  # tensors the kernel cannot take: the PyTorch plan
                self._fallback().apply(x, a, outputs, rank)
        elif mode == "gather":  # [N, 1, R] kept 3-d end to end: no squeeze/unsqueeze per projection
            h = torch.bmm(x.unsqueeze(1), self._rows_t(a))
            for i, (y, b) in enumerate(outputs):
                y.unsqueeze(1).baddbmm_(h[:, :, i * rank : (i + 1) * rank], self._rows_t(b))
        elif mode == "grouped":  # h stays in the padded [span, m, R] layout until each output is gathered back
            h = torch.bmm(self._scatter(x), self._window(a))
            for i, (y, b) in enumerate(outputs):
                self._expand_grouped(y, h[:, :, i * rank : (i + 1) * rank], b)
        elif mode == "single" and (self._uniform is None or not self._uniform.apply(x, a, outputs, rank, key)):
            h = x @ self._slot_t(a)
            for i, (y, b) in enumerate(outputs):
                y.addmm_(h[:, i * rank : (i + 1) * rank], self._slot_t(b))

    def side_rows(self, x_rows: int) -> tuple | None:
        """This plan's rows for `SideWorker.start` (`native_lora.RowOrder.side_rows`) with an x of `x_rows` rows,
        or None where only `apply` can run it (the PyTorch paths)."""
        if self.mode == "native":
            return self._native.side_rows(x_rows)
        if self.mode == "single" and self._uniform is not None:
            return self._uniform.side_rows(x_rows)
        return None

    def delta(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """x [N, in] -> x[n] @ a[idx[n]].T @ b[idx[n]].T as a new [N, out] tensor: the same plan, out of place and
        without cached state, so autograd can differentiate it (training; `apply` is the in-place serving path).
        `a` [S, r, in], `b` [S, out, r] may be views of a trainable tensor."""
        if self.mode == "none":
            return x.new_zeros(x.shape[0], b.shape[1])
        if self.mode in ("native", "triton"):
            return self._fallback().delta(x, a, b)
        if self.mode == "single":
            return (x @ a[self.slot].T) @ b[self.slot].T
        if self.mode == "gather":
            h = torch.bmm(x.unsqueeze(1), a.index_select(0, self.idx).transpose(1, 2))
            return torch.bmm(h, b.index_select(0, self.idx).transpose(1, 2)).squeeze(1)
        window, block = slice(self._lo, self._lo + self._span), self._span * self._m
        if self._contiguous:
            xs = x.view(self._span, self._m, x.shape[1])
        else:
            padded = x.new_zeros(block + self._scratch, x.shape[1]).index_copy(0, self._pos, x)
            xs = padded[:block].view(self._span, self._m, x.shape[1])
        d = torch.bmm(torch.bmm(xs, a[window].transpose(1, 2)), b[window].transpose(1, 2)).view(block, -1)
        return d if self._contiguous else x.new_zeros(x.shape[0], d.shape[1]).index_add(0, self._row_of, d)

    def release(self) -> None:
        """Drop cached gathers and buffers (a later use rebuilds them)."""
        self._gathered.clear()
        self._rows_flat = self._rows_buffer = self._previous = None
        self._buffers.clear()
        if self.mode in ("native", "triton") and self._fallback_plan is not None:
            self._fallback_plan.release()


def apply_lora(
    batch: LoraBatch | None,
    x: torch.Tensor,
    a: torch.Tensor,
    outputs: list[tuple[torch.Tensor, torch.Tensor]],
    rank: int,
) -> None:
    """Shrink once for every projection that shares input `x`, then expand into each output in place.

    `a` stacks the projections' A matrices along R (R = rank * len(outputs)); `outputs` pairs each projection's
    output [N, out] with its B slot tensor [S, out, rank].
    """
    if batch is not None and batch.mode != "none":
        batch.apply(x, a, outputs, rank)


def _self_check(seed: int = 0) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    slots, rank, fan_in, fan_out, rows = 5, 8, 48, 40, 11
    a = torch.randn(slots, rank, fan_in, generator=gen, dtype=torch.float64)
    b = torch.randn(slots, fan_out, rank, generator=gen, dtype=torch.float64)
    a[0].zero_()
    b[0].zero_()
    x = torch.randn(rows, fan_in, generator=gen, dtype=torch.float64)
    errors = {}
    mixed = torch.randint(0, slots, (rows,), generator=gen)
    for name, idx, kernel in [("gather", mixed, "gather"), ("grouped", mixed, "grouped"), ("native", mixed, "native"),
                              ("single", torch.full((rows,), 3), "auto"),
                              ("none", torch.zeros(rows, dtype=torch.long), "auto")]:  # fmt: skip
        want = expand_reference(shrink_reference(x, a, idx), b, idx)
        batch = LoraBatch(idx, kernel=kernel)
        got = torch.zeros(rows, fan_out, dtype=torch.float64)
        apply_lora(batch, x, a, [(got, b)], rank)
        errors[name] = float((got - want).norm() / max(want.norm(), 1e-30))
    return errors


if __name__ == "__main__":
    for case, err in _self_check().items():
        print(f"{case:7s} relative error {err:.2e}")
