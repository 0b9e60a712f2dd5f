"""Punica-style batched-LoRA kernels in Triton: SGMV for segments of rows on one adapter (prefill chunks,
co-training's sorted batches) and BGMV for rows that each carry their own adapter (decode), shrink and expand.

Same contract as the PyTorch paths of `adapters.batched_lora.LoraBatch` (which dispatches here for `triton`):

    shrink:  h[n]  = x[n] @ A[idx[n]].T      x [N, in], A [S, R, in]   -> h [N, R] (float32)
    expand:  y[n] += h[n] @ B[idx[n]].T      h [N, r],  B [S, out, r]  -> y [N, out], in place

Slot 0 means "no adapter": its rows get h = 0 and their y is never written (bit for bit untouched). Adapters of
lower rank sit zero-padded in the slot rank (the slot bank pads them), so one launch serves mixed ranks. Weights
are read in place through their strides (the slot bank stores every matrix transposed inside one slot-major
buffer); accumulation is float32 whatever the storage dtype, and h stays float32 between shrink and expand.
`TritonRows` is the per-step plan: from the host list of slots (no device sync) it picks SGMV when rows come in
runs of one adapter (at least `SGMV_MIN_ROWS_PER_SEGMENT` rows per run on average) and BGMV otherwise.

Written from the Punica paper's description (Chen et al. 2023, arXiv:2310.18547); block sizes are untuned.
Under the interpreter SGMV-shrink's `tl.dot` runs on float32 copies of 16-bit tiles: triton 3.9's interpreter
returns garbage for a bfloat16 `tl.dot` (checked 2026-12-04); on a GPU the 16-bit dot runs as written.

    TRITON_INTERPRET=1 python -m adapters.triton_lora      # self-check on CPU tensors against the float64 oracle
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SGMV_MIN_ROWS_PER_SEGMENT = 4
BLOCK_M = 16  # SGMV rows per tile (tl.dot needs >= 16 on GPUs)


def interpreted() -> bool:
    """True when this process's kernels run in the Triton interpreter (CPU tensors; TRITON_INTERPRET=1)."""
    return not isinstance(_bgmv_shrink, triton.runtime.JITFunction)


# -- BGMV: one program per (row, tile of outputs) ------------------------------------------------------------
@triton.jit
def _bgmv_shrink(x_ptr, a_ptr, h_ptr, idx_ptr, K, R, sx_row, sx_k, sa_slot, sa_r, sa_k, sh_row, sh_r,
                 BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    slot = tl.load(idx_ptr + row).to(tl.int64)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    if slot != 0:
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            xv = tl.load(x_ptr + row * sx_row + offs_k * sx_k, mask=k_mask, other=0.0).to(tl.float32)
            a_ptrs = a_ptr + slot * sa_slot + offs_r[:, None] * sa_r + offs_k[None, :] * sa_k
            av = tl.load(a_ptrs, mask=r_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(av * xv[None, :], axis=1)
    tl.store(h_ptr + row * sh_row + offs_r * sh_r, acc, mask=r_mask)


@triton.jit
def _bgmv_expand(h_ptr, b_ptr, y_ptr, idx_ptr, N, R, sh_row, sh_r, sb_slot, sb_n, sb_r, sy_row, sy_n,
                 BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    slot = tl.load(idx_ptr + row).to(tl.int64)
    if slot != 0:
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_mask = offs_r < R
            hv = tl.load(h_ptr + row * sh_row + offs_r * sh_r, mask=r_mask, other=0.0).to(tl.float32)
            b_ptrs = b_ptr + slot * sb_slot + offs_n[:, None] * sb_n + offs_r[None, :] * sb_r
            bv = tl.load(b_ptrs, mask=n_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(bv * hv[None, :], axis=1)
        y_ptrs = y_ptr + row * sy_row + offs_n * sy_n
        yv = tl.load(y_ptrs, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(y_ptrs, (yv + acc).to(y_ptr.dtype.element_ty), mask=n_mask)


# -- SGMV: one program per (segment, tile of its rows, tile of outputs); segments are [G, 3] (start, len, slot) -
@triton.jit
def _sgmv_shrink(x_ptr, a_ptr, h_ptr, seg_ptr, K, R, sx_row, sx_k, sa_slot, sa_r, sa_k, sh_row, sh_r,
                 BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, F32_DOT: tl.constexpr):  # fmt: skip
    m0 = tl.program_id(0) * BLOCK_M
    seg = seg_ptr + tl.program_id(2) * 3
    length = tl.load(seg + 1)
    if m0 < length:
        slot = tl.load(seg + 2).to(tl.int64)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < length
        rows = tl.load(seg).to(tl.int64) + offs_m
        offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        if slot != 0:
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_mask = offs_k < K
                x_ptrs = x_ptr + rows[:, None] * sx_row + offs_k[None, :] * sx_k
                xt = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                a_ptrs = a_ptr + slot * sa_slot + offs_k[:, None] * sa_k + offs_r[None, :] * sa_r
                at = tl.load(a_ptrs, mask=k_mask[:, None] & r_mask[None, :], other=0.0).to(xt.dtype)
                if F32_DOT:  # float32 operands (full precision, not TF32), or 16-bit ones upcast for the interpreter
                    acc = tl.dot(xt.to(tl.float32), at.to(tl.float32), acc, input_precision="ieee")
                else:
                    acc = tl.dot(xt, at, acc)
        tl.store(h_ptr + rows[:, None] * sh_row + offs_r[None, :] * sh_r, acc, mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def _sgmv_expand(h_ptr, b_ptr, y_ptr, seg_ptr, N, R, sh_row, sh_r, sb_slot, sb_n, sb_r, sy_row, sy_n,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):  # fmt: skip
    m0 = tl.program_id(0) * BLOCK_M
    seg = seg_ptr + tl.program_id(2) * 3
    length = tl.load(seg + 1)
    slot = tl.load(seg + 2).to(tl.int64)
    if (m0 < length) & (slot != 0):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < length
        rows = tl.load(seg).to(tl.int64) + offs_m
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_mask = offs_r < R
            ht = tl.load(h_ptr + rows[:, None] * sh_row + offs_r[None, :] * sh_r,
                         mask=m_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)  # fmt: skip
            b_ptrs = b_ptr + slot * sb_slot + offs_r[:, None] * sb_r + offs_n[None, :] * sb_n
            bt = tl.load(b_ptrs, mask=r_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)
            acc = tl.dot(ht, bt, acc, input_precision="ieee")
        y_ptrs = y_ptr + rows[:, None] * sy_row + offs_n[None, :] * sy_n
        y_mask = m_mask[:, None] & n_mask[None, :]
        yv = tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)
        tl.store(y_ptrs, (yv + acc).to(y_ptr.dtype.element_ty), mask=y_mask)


def _block(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, n))))


def segments(slots: list[int]) -> list[tuple[int, int, int]]:
    """Runs of consecutive rows on one slot: (start, length, slot) each."""
    runs: list[tuple[int, int, int]] = []
    for row, slot in enumerate(slots):
        if runs and runs[-1][2] == slot:
            start, length, _ = runs[-1]
            runs[-1] = (start, length + 1, slot)
        else:
            runs.append((row, 1, slot))
    return runs


class TritonRows:
    """The rows of one forward for the kernels: BGMV over per-row slots, or SGMV over runs of one slot.

    `slots` is the host list of per-row slots. A plan whose rows all use one slot applies to any number of rows
    (the engine keeps one per slot for prefill chunks): its single segment is sized from x at call time.
    """

    def __init__(self, slots: list[int], device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.rows = len(slots)
        runs = segments(slots)
        self.single_slot: int | None = slots[0] if len(runs) == 1 else None
        self.kind = (
            "sgmv" if len(runs) * SGMV_MIN_ROWS_PER_SEGMENT <= self.rows or self.single_slot is not None else "bgmv"
        )
        self._max_len = max((length for _, length, _ in runs), default=0)
        self._seg: dict[int, torch.Tensor] = {}
        if self.kind == "sgmv" and self.single_slot is None:
            self._seg[self.rows] = torch.tensor(runs, dtype=torch.int32, device=self.device)
        self._idx = torch.tensor(slots, dtype=torch.int32, device=self.device) if self.kind == "bgmv" else None

    @classmethod
    def per_row(cls, idx: torch.Tensor) -> TritonRows:
        """A BGMV plan over an int32 slot tensor already on the device (one slot per row; no host copy), e.g. a
        static buffer a CUDA graph reads: its contents may change between calls, its length may not."""
        if idx.dtype != torch.int32 or idx.dim() != 1:
            raise ValueError(f"per_row needs a 1-d int32 slot tensor, got {idx.dtype} with shape {tuple(idx.shape)}")
        plan = cls([0, 1], idx.device)  # two one-row runs: a BGMV plan
        plan.rows, plan._idx = int(idx.shape[0]), idx
        return plan

    def _segments(self, rows: int) -> tuple[torch.Tensor, int]:
        seg = self._seg.get(rows)
        if seg is None:
            if self.single_slot is None:
                raise ValueError(f"this plan is for {self.rows} rows; got {rows}")
            seg = self._seg[rows] = torch.tensor([[0, rows, self.single_slot]], dtype=torch.int32, device=self.device)
        return seg, rows if self.single_slot is not None else self._max_len

    def _check(self, x: torch.Tensor, weights: torch.Tensor, name: str) -> None:
        if x.dim() != 2 or weights.dim() != 3 or x.shape[1] != weights.shape[2]:
            raise ValueError(
                f"{name}: want x [N, k] and weights [S, n, k]; got {tuple(x.shape)}, {tuple(weights.shape)}"
            )
        if x.device != weights.device or x.device.type != self.device.type:
            raise ValueError(f"{name}: tensors on {x.device} / {weights.device}, plan on {self.device}")
        if self.single_slot is None and x.shape[0] != self.rows:
            raise ValueError(f"{name}: {x.shape[0]} rows but the plan has {self.rows}")

    def shrink(self, x: torch.Tensor, a: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """h [N, R] = x[n] @ a[slot[n]].T in float32 (0 for rows on slot 0); written into `out` if given."""
        self._check(x, a, "shrink")
        rows, big_r, k = x.shape[0], a.shape[1], a.shape[2]
        h = out if out is not None else torch.empty(rows, big_r, dtype=torch.float32, device=x.device)
        if rows == 0:
            return h
        args = (k, big_r, *x.stride(), *a.stride(), *h.stride())
        if self.kind == "bgmv":
            block_r = _block(big_r, 16, 64)
            grid = (rows, triton.cdiv(big_r, block_r))
            _bgmv_shrink[grid](x, a, h, self._idx, *args, BLOCK_R=block_r, BLOCK_K=_block(k, 16, 128))
        else:
            seg, max_len = self._segments(rows)
            block_r = _block(big_r, 16, 64)
            grid = (triton.cdiv(max_len, BLOCK_M), triton.cdiv(big_r, block_r), seg.shape[0])
            _sgmv_shrink[grid](x, a, h, seg, *args, BLOCK_M=BLOCK_M, BLOCK_R=block_r, BLOCK_K=_block(k, 16, 64),
                               F32_DOT=x.dtype == torch.float32 or interpreted())  # fmt: skip
        return h

    def expand_add(self, y: torch.Tensor, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """y [N, out] += h[n] @ b[slot[n]].T in place (rows on slot 0 untouched); returns y."""
        self._check(h, b, "expand")
        rows, n, r = h.shape[0], b.shape[1], b.shape[2]
        if y.shape != (rows, n) or y.device != h.device:
            raise ValueError(f"expand: y {tuple(y.shape)} on {y.device}, want ({rows}, {n}) on {h.device}")
        if rows == 0:
            return y
        args = (n, r, *h.stride(), *b.stride(), *y.stride())
        if self.kind == "bgmv":
            block_n = _block(n, 16, 128)
            grid = (rows, triton.cdiv(n, block_n))
            _bgmv_expand[grid](h, b, y, self._idx, *args, BLOCK_N=block_n, BLOCK_R=_block(r, 16, 64))
        else:
            seg, max_len = self._segments(rows)
            block_n = _block(n, 16, 64)
            grid = (triton.cdiv(max_len, BLOCK_M), triton.cdiv(n, block_n), seg.shape[0])
            _sgmv_expand[grid](h, b, y, seg, *args, BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_R=_block(r, 16, 64))
        return y

    def apply(self, x: torch.Tensor, a: torch.Tensor, outputs: list[tuple[torch.Tensor, torch.Tensor]],
              rank: int) -> None:  # fmt: skip
        """One shrink for every projection sharing x (`a` stacks their A along R), then one expand per output."""
        h = self.shrink(x, a)
        for i, (y, b) in enumerate(outputs):
            self.expand_add(y, h[:, i * rank : (i + 1) * rank], b)


def _self_check(seed: int = 0) -> dict[str, float]:
    """Relative error against the float64 oracle for a BGMV and an SGMV plan (CPU tensors need the interpreter)."""
    from adapters.lora_reference import expand_reference, shrink_reference

    device = "cuda" if torch.cuda.is_available() and not interpreted() else "cpu"
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(5, 8, 37, generator=gen)
    b = torch.randn(5, 29, 8, generator=gen)
    a[0], b[0] = 0.0, 0.0  # slot 0: no adapter
    x = torch.randn(11, 37, generator=gen)
    errors = {}
    for name, slots in [("bgmv", [0, 3, 1, 4, 2, 2, 0, 1, 3, 4, 1]), ("sgmv", [2] * 7 + [4] * 4)]:
        idx = torch.tensor(slots)
        want = expand_reference(shrink_reference(x.double(), a.double(), idx), b.double(), idx)
        plan = TritonRows(slots, device)
        y = torch.zeros(11, 29, device=device)
        plan.apply(x.to(device), a.to(device), [(y, b.to(device))], 8)
        errors[f"{name} ({plan.kind})"] = float((y.cpu().double() - want).norm() / want.norm())
    return errors


if __name__ == "__main__":
    for case, err in _self_check().items():
        print(f"{case:14s} relative error {err:.2e}")
