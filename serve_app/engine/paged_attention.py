"""Decode attention over a paged KV cache: a Triton kernel that reads only each row's live blocks, and the
PyTorch reference it is checked against (the engine's decode attention on CUDA: serve_app/engine/attention.py).

Layout: k_cache / v_cache [num_blocks, block_size, kv_heads, head_dim]; a row's token at position p sits in block
`tables[row, p // block_size]` at offset `p % block_size` (see `block_manager.BlockManager`). One query token per
row (decode): q [B, heads, head_dim] attends to positions 0..lengths[row]-1, so no mask and no padding to the
batch's longest row. Grouped-query attention: query head h reads KV head h // (heads // kv_heads).

The kernel runs one program per (row, query head) and walks the row's blocks with an online softmax (float32
running max, sum and accumulator). Block size must be a power of two >= 16; any head_dim (masked to a power of two).

    TRITON_INTERPRET=1 python -m serve_app.engine.paged_attention     # self-check on CPU tensors
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode(q_ptr, k_ptr, v_ptr, tables_ptr, lengths_ptr, out_ptr, scale, HEAD_DIM,
                  sq_b, sq_h, sk_blk, sk_pos, sk_h, sv_blk, sv_pos, sv_h, st_b, so_b, so_h,
                  GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    kv_head = head // GROUP
    length = tl.load(lengths_ptr + row)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q = tl.load(q_ptr + row * sq_b + head * sq_h + offs_d, mask=d_mask, other=0.0).to(tl.float32) * scale
    offs_p = tl.arange(0, BLOCK_SIZE)
    m = tl.max(tl.full((BLOCK_SIZE,), float("-inf"), tl.float32), axis=0)
    total = tl.sum(tl.zeros((BLOCK_SIZE,), tl.float32), axis=0)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for start in range(0, length, BLOCK_SIZE):
        block = tl.load(tables_ptr + row * st_b + start // BLOCK_SIZE).to(tl.int64)
        p_mask = start + offs_p < length
        kv_mask = p_mask[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + block * sk_blk + offs_p[:, None] * sk_pos + kv_head * sk_h + offs_d[None, :],
                    mask=kv_mask, other=0.0).to(tl.float32)  # fmt: skip
        scores = tl.where(p_mask, tl.sum(k * q[None, :], axis=1), float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=0))
        p = tl.exp(scores - m_new)
        alpha = tl.exp(m - m_new)
        v = tl.load(v_ptr + block * sv_blk + offs_p[:, None] * sv_pos + kv_head * sv_h + offs_d[None, :],
                    mask=kv_mask, other=0.0).to(tl.float32)  # fmt: skip
        total = total * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m = m_new
    out = acc / total
    tl.store(out_ptr + row * so_b + head * so_h + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
           lengths: torch.Tensor) -> None:  # fmt: skip
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"want q [B, H, d], caches [blocks, block_size, kv_heads, d]; got {tuple(q.shape)}, "
                         f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}")  # fmt: skip
    heads, kv_heads = q.shape[1], k_cache.shape[2]
    if heads % kv_heads or q.shape[2] != k_cache.shape[3]:
        raise ValueError(f"{heads} query heads over {kv_heads} KV heads, head_dim {q.shape[2]} vs {k_cache.shape[3]}")
    if tables.shape[0] != q.shape[0] or lengths.shape != (q.shape[0],):
        raise ValueError(f"tables {tuple(tables.shape)} / lengths {tuple(lengths.shape)} for {q.shape[0]} rows")
    block_size = k_cache.shape[1]
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                 lengths: torch.Tensor, scale: float) -> torch.Tensor:  # fmt: skip
    """q [B, H, d] -> [B, H, d]: each row's query against its `lengths[row]` cached tokens (lengths >= 1)."""
    _check(q, k_cache, v_cache, tables, lengths)
    rows, heads, head_dim = q.shape
    out = torch.empty_like(q)
    if rows == 0:
        return out
    k, v = k_cache, v_cache
    if q.stride(2) != 1 or k.stride(3) != 1 or v.stride(3) != 1:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    grid = (rows, heads)
    _paged_decode[grid](q, k, v, tables, lengths, out, scale, head_dim, q.stride(0), q.stride(1),
                        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
                        tables.stride(0), out.stride(0), out.stride(1), GROUP=heads // k.shape[2],
                        BLOCK_SIZE=k.shape[1], BLOCK_D=max(16, triton.next_power_of_2(head_dim)))  # fmt: skip
    return out


def paged_decode_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                           lengths: torch.Tensor, scale: float) -> torch.Tensor:  # fmt: skip
    """Row by row in float64: gather the row's positions through its table, softmax(q k^T * scale) v."""
    _check(q, k_cache, v_cache, tables, lengths)
    block_size, kv_heads, head_dim = k_cache.shape[1:]
    group = q.shape[1] // kv_heads
    flat_k = k_cache.reshape(-1, kv_heads, head_dim).double()
    flat_v = v_cache.reshape(-1, kv_heads, head_dim).double()
    out = []
    for row in range(q.shape[0]):
        positions = torch.arange(int(lengths[row]))
        slots = tables[row].long().cpu()[positions // block_size] * block_size + positions % block_size
        k = flat_k[slots.to(flat_k.device)].repeat_interleave(group, dim=1)  # [L, H, d]
        v = flat_v[slots.to(flat_v.device)].repeat_interleave(group, dim=1)
        weights = torch.softmax(torch.einsum("hd,lhd->hl", q[row].double(), k) * scale, dim=-1)
        out.append(torch.einsum("hl,lhd->hd", weights, v))
    return torch.stack(out).to(q.dtype) if out else torch.empty_like(q)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor) -> None:  # fmt: skip
    """Store tokens' k/v [n, kv_heads, d] at physical `slots` [n] (from `BlockManager.slot`)."""
    kv_heads, head_dim = k_cache.shape[2:]
    k_cache.view(-1, kv_heads, head_dim).index_copy_(0, slots, k)
    v_cache.view(-1, kv_heads, head_dim).index_copy_(0, slots, v)


if __name__ == "__main__":
    gen = torch.Generator().manual_seed(0)
    k_cache, v_cache = torch.randn(2, 8, 16, 2, 24, generator=gen)
    tables = torch.tensor([[3, 0, 5], [7, 1, 0]], dtype=torch.int32)
    lengths = torch.tensor([40, 17], dtype=torch.int32)
    q = torch.randn(2, 4, 24, generator=gen)
    want = paged_decode_reference(q, k_cache, v_cache, tables, lengths, 24**-0.5)
    got = paged_decode(q, k_cache, v_cache, tables, lengths, 24**-0.5)
    print(f"paged decode relative error {float((got - want).norm() / want.norm()):.2e}")
