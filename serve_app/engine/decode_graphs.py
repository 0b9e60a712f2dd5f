"""The decode step on static buffers, captured as one CUDA graph per padded batch size of a ladder (issue 22 item 3).

A decode step launches a few hundred small kernels; on a GPU at serving batch sizes their launch cost, not the
weights' memory traffic, sets the step time. A CUDA graph replays them all in one launch, but only over fixed
shapes and fixed addresses, with no host sync inside. So this module owns fixed-shape inputs, written in place each
step, for the batch sizes of a ladder (1, 2, 4, ... up to `cuda_graph_max_batch`, that size included):

    tokens, positions, KV write slots, lengths, LoRA slot per row, block tables [rows, blocks of max_seq_len]

A live batch of n rows runs at the smallest ladder size >= n; the padded rows (token 0, position 0, no adapter)
write and read only the paged KV cache's scratch block (`PagedKV(scratch=True)`), never a live block, and their
logits are dropped. Everything the step reads per row goes to the device in one host-to-device copy of one staging
tensor; the typed buffers are filled from it inside the step (inside the graph). The step has no host sync and no
per-step shape: decode attention reads the static block tables (the Triton paged kernel) or a gather of every
row's max_seq_len slots with a length mask (PyTorch), and LoRA runs from the per-row slot tensor (`StaticLora`: the
Triton BGMV kernels, or PyTorch index_select + bmm; no host plan per batch). The sampler stays outside.

Modes (`engine.cuda_graphs`, resolved by `resolve_mode`): `graphs` captures each ladder size at engine start
(after a warm-up on a side stream, largest first, one shared memory pool) and replays it; a capture that raises
logs a warning naming the reason and the engine decodes eagerly. `static_eager` runs the very same step without a
capture (CPU tests check it against the eager engine token for token). Batches above the ladder decode eagerly.

    .venv/bin/python -m pytest -q tests/test_engine_graphs.py    # CPU: the static step; CUDA (gpu mark): capture
"""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Any

import torch

from adapters import triton_runtime
from serve_app.engine.attention import DecodeAttention
from serve_app.engine.config import EngineConfig
from serve_app.engine.model_runner import ModelRunner
from serve_app.engine.paged_kv import PagedKV
from serve_app.engine.sequence import Sequence

log = logging.getLogger(__name__)

TOKEN, POSITION, WRITE, LENGTH, SLOT, TABLE = range(6)  # columns of a staging row (TABLE: its first block)


def ladder(max_batch: int) -> list[int]:
    """Padded batch sizes: powers of two below `max_batch`, then `max_batch` itself."""
    sizes = [1]
    while sizes[-1] * 2 < max_batch:
        sizes.append(sizes[-1] * 2)
    if sizes[-1] < max_batch:
        sizes.append(max_batch)
    return sizes


def pick(sizes: list[int], rows: int) -> int | None:
    """The smallest ladder size that holds `rows` rows (None: more rows than the largest)."""
    return next((size for size in sizes if size >= rows), None)


def resolve_mode(config: EngineConfig, device: torch.device, triton_attention: bool) -> str:
    """'graphs', 'static_eager' or 'off' for an engine on `device` (`triton_attention`: decode attention runs the
    Triton paged kernel). Raises ValueError naming the field for `on` without CUDA."""
    mode = config.cuda_graphs
    if mode == "on" and device.type != "cuda":
        raise ValueError(f"engine.cuda_graphs 'on' needs a CUDA device; this engine runs on {device}")
    if mode == "on" or (mode == "auto" and device.type == "cuda" and triton_attention):
        return "graphs"
    return "static_eager" if mode == "static_eager" else "off"


class StaticLora:
    """The batched-LoRA operator over per-row slots held in a device tensor (no host plan per batch): the Triton
    BGMV kernels (rows on slot 0 untouched), or PyTorch index_select + bmm (slot 0 is all zeros: adds zeros)."""

    active = True

    def __init__(self, idx: torch.Tensor, idx32: torch.Tensor, triton: bool) -> None:
        self.idx = idx
        self._triton = None
        if triton:
            module = triton_runtime.load()
            assert module is not None
            # a BGMV plan whose per-row slots are the static idx32 tensor
            self._triton = module.TritonRows.per_row(idx32)

    def apply(self, x: torch.Tensor, a: torch.Tensor, outputs: list[tuple[torch.Tensor, torch.Tensor]], rank: int,
              key: Any = None) -> None:  # fmt: skip
        if self._triton is not None:
            self._triton.apply(x, a, outputs, rank)
            return
        h = torch.bmm(x.unsqueeze(1), a.index_select(0, self.idx).transpose(1, 2))
        for i, (y, b) in enumerate(outputs):
            y.unsqueeze(1).baddbmm_(h[:, :, i * rank : (i + 1) * rank], b.index_select(0, self.idx).transpose(1, 2))

    def side_rows(self, x_rows: int) -> None:
        """Never on the LoRA side thread (its row order is a host plan)."""
        return None


class StaticDecode:
    """Static decode inputs for every ladder size, the step over them, and (after `capture`) its CUDA graphs."""

    def __init__(self, runner: ModelRunner, kv: PagedKV, max_batch: int, kernels: ModuleType | None,
                 triton_lora: bool) -> None:  # fmt: skip
        if kv.scratch_block is None:
            raise ValueError("static decode needs a PagedKV with a scratch block (scratch=True)")
        device, block = kv.k.device, kv.block_size
        self.runner, self.kv, self.sizes = runner, kv, ladder(max_batch)
        self.width = -(-kv.max_len // block)  # block-table columns: blocks of one max_seq_len sequence
        rows, scratch = self.sizes[-1], kv.scratch_block
        self._pad = [0, 0, scratch * block, 1, 0] + [scratch] * self.width  # a padded row: the scratch block only
        self.host = torch.tensor([self._pad] * rows, dtype=torch.long)
        self.host = self.host.pin_memory() if device.type == "cuda" else self.host
        self.staging = self.host.to(device)

        def zeros(*shape: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dtype, device=device)

        self.tokens, self.positions, self.write, self.slots = (zeros(rows) for _ in range(4))
        self.lengths, self.slots32 = zeros(rows, dtype=torch.int32) + 1, zeros(rows, dtype=torch.int32)
        self.tables = zeros(rows, self.width, dtype=torch.int32)
        self.triton_lora = triton_lora
        self.gather: torch.Tensor | None = None  # PyTorch attention: every row gathers max_seq_len slots ...
        self.mask: torch.Tensor | None = None  # ... and a length mask hides the dead ones
        if kernels is None:
            pos = torch.arange(kv.max_len, device=device)
            self._pos, self._col, self._off = pos, pos // block, pos % block
            self.gather, self.mask = zeros(rows, kv.max_len), zeros(rows, 1, 1, kv.max_len, dtype=torch.bool)
        self._plans = {size: self._plan(size, kernels) for size in self.sizes}
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.last_size = 0  # the ladder size of the latest step (tests)

    def _plan(self, size: int, kernels: ModuleType | None) -> tuple[DecodeAttention, StaticLora]:
        gather = self.gather[:size].view(-1) if self.gather is not None else None
        mask = self.mask[:size] if self.mask is not None else None
        tables = self.tables[:size] if kernels is not None else None
        attention = DecodeAttention(self.kv, self.write[:size], tables, self.lengths[:size], gather, mask, kernels)
        return attention, StaticLora(self.slots[:size], self.slots32[:size], self.triton_lora)

    @torch.inference_mode()
    def _forward(self, size: int) -> torch.Tensor:
        """The captured step: typed inputs from the staging rows, then the decode forward -> logits [size, V]."""
        rows = self.staging[:size]
        for buffer, column in ((self.tokens, TOKEN), (self.positions, POSITION), (self.write, WRITE),
                               (self.lengths, LENGTH), (self.slots, SLOT)):  # fmt: skip
            buffer[:size].copy_(rows[:, column])
        if self.triton_lora:
            self.slots32[:size].copy_(rows[:, SLOT])
        if self.gather is None:
            self.tables[:size].copy_(rows[:, TABLE:])
        else:
            live = self._pos[None, :] < rows[:, LENGTH, None]
            slots = rows[:, TABLE:].index_select(1, self._col) * self.kv.block_size + self._off
            self.gather[:size].copy_(torch.where(live, slots, 0))  # (dead positions read slot 0, masked out)
            self.mask[:size, 0, 0].copy_(live)  # type: ignore[index]
        attention, lora = self._plans[size]
        return self.runner.decode(self.tokens[:size], self.positions[:size], lora, attention)  # type: ignore[arg-type]

    def run(self, rows: list[Sequence]) -> torch.Tensor | None:
        """Logits [len(rows), V] of one decode step at the smallest ladder size >= len(rows) (graph replay when
        captured); None when the batch is above the ladder (the caller decodes eagerly). Every row's next KV slot
        is already reserved (`PagedKV.append`)."""
        size = pick(self.sizes, len(rows))
        if size is None:
            return None
        block, data = self.kv.block_size, []
        for seq in rows:
            table, n = self.kv.table(seq.request_id), seq.length
            write = table[(n - 1) // block] * block + (n - 1) % block
            pad = self._pad[TABLE : TABLE + self.width - len(table)]
            data.append([seq.output_ids[-1], n - 1, write, n, seq.lora_slot, *table, *pad])
        data += [self._pad] * (size - len(rows))
        self.host[:size] = torch.tensor(data, dtype=torch.long)
        self.staging[:size].copy_(self.host[:size], non_blocking=True)  # the step's one host-to-device copy
        self.last_size = size
        graph = self.graphs.get(size)
        if graph is None:
            return self._forward(size)[: len(rows)]
        graph[0].replay()
        return graph[1][: len(rows)]

    def capture(self) -> None:
        """One CUDA graph per ladder size, largest first, in one shared memory pool, after a warm-up on a side
        stream (Triton compiles, cuBLAS picks its kernels). Every row is a padded one meanwhile (scratch block).
        Raises whatever capturing raises."""
        self.host[:] = torch.tensor(self._pad, dtype=torch.long)
        self.staging.copy_(self.host)
        stream = torch.cuda.Stream(self.kv.k.device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for size in self.sizes:
                for _ in range(2):
                    self._forward(size)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        pool, graphs = torch.cuda.graph_pool_handle(), {}
        for size in reversed(self.sizes):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._forward(size)
            graphs[size] = (graph, logits)
        self.graphs = graphs


def build(mode: str, runner: ModelRunner, kv: PagedKV, config: EngineConfig, kernels: ModuleType | None,
          lora_kernel: str) -> StaticDecode | None:  # fmt: skip
    """The engine's static decode for `mode` (`resolve_mode`), captured for 'graphs'; None for 'off' or when the
    capture fails (logged as a warning with the reason: the engine then decodes eagerly)."""
    if mode == "off":
        return None
    device = kv.k.device
    triton_lora = lora_kernel == "triton" or (lora_kernel == "auto" and triton_runtime.auto_picks(device))
    static = StaticDecode(runner, kv, config.graph_max_batch, kernels, triton_lora)
    if mode != "graphs":
        return static
    try:
        static.capture()
    except Exception as err:  # never fail the engine because of graphs
        log.warning("engine.cuda_graphs: capturing the decode step failed (%s: %s); decoding eagerly",
                    type(err).__name__, err)  # fmt: skip
        return None
    log.info("engine.cuda_graphs: decode captured for batch sizes %s", static.sizes)
    return static
