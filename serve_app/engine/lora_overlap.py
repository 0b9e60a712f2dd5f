"""Whether an engine runs its LoRA on a side thread (`engine.lora_overlap`), decided by measuring, once.

The side thread (`adapters/lora_side_thread.py`) takes one of PyTorch's threads and hides LoRA time behind the
base matmuls (the caller computes whatever rows the worker has not reached, so it never waits on it). That pays
when PyTorch gains less from its last thread than the LoRA costs: a small model's matmuls at serving batch sizes
are too small to split, the core idles, and the LoRA fills it; a 576-wide model's prefill chunks already use every
core. So `auto` (with at least 2 PyTorch threads) times a serving-size probe step (a decode step of `max_running`
rows, capped at 64, round-robin over up to `max_loras` adapters, plus a prefill chunk of `prefill_chunk` tokens,
capped at 64: a typical chat prompt) three ways: the base on all of PyTorch's threads and on one fewer, and with
LoRA in place on all of them. In alternating blocks of back-to-back passes, each block paired (a drifting machine
hits all three alike), it takes the medians of PyTorch's gain from its last thread and of the LoRA's cost, both
relative to the base step, and gives the side thread the core if the gain is below half that cost (about what the
overlap hides; the rest is Python around each call). Both ways give the same bits (y = base + delta in the same
order), so the choice changes speed only. The answer is cached per process by model shape, batch, chunk and
thread count (tests build many engines of one model). `on` / `off` skip it.

The thread count is scoped to the engine's own work: `Overlap.threads()` lowers PyTorch's count for one engine step
and restores the caller's after it (about 0.2 us a pair), so a training worker that builds an engine for a quick
eval keeps all its threads for training; `Overlap.close()` (`LoraEngine.close()`) stops the worker thread.

    python -m serve_app.engine --base tiny-llama --prompt hi      # logs the choice (INFO)
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from adapters import native_lora
from adapters.batched_lora import LoraBatch
from adapters.lora_side_thread import SideWorker
from serve_app.engine.attention import DecodeAttention, PrefillAttention
from serve_app.engine.model_runner import ModelRunner

log = logging.getLogger(__name__)

HIDDEN_SHARE = 0.5  # about how much of the LoRA's cost the side thread hides (the rest: Python around each call)
MAX_PROBE_S = 1.0  # a model whose probe forward takes longer than this is big enough for PyTorch's threads
PROBE_ROWS, PROBE_CHUNK = 64, 64  # at most this many decode rows; prompt tokens of the prefill chunk
BLOCKS, BLOCK_PASSES = 7, 6  # per way, alternating: blocks of back-to-back passes (steady state)
SLOW_PROBE_S = 0.05  # a probe slower than this: blocks of one pass (big models: the difference is large anyway)
SETTLE_S = 0.005  # before a block: PyTorch's OpenMP pool stops spinning after the last block's thread count
_decisions: dict[tuple, bool] = {}


@dataclass
class Overlap:
    """An engine's side worker (None: LoRA in place) and PyTorch's thread count during its steps (None: the
    caller's count, untouched)."""

    worker: SideWorker | None = None
    torch_threads: int | None = None

    @contextlib.contextmanager
    def threads(self) -> Iterator[None]:
        """PyTorch's thread count set for the engine's work inside, the caller's restored after it."""
        want, before = self.torch_threads, torch.get_num_threads()
        if want is None or want == before:
            yield
            return
        torch.set_num_threads(want)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def close(self) -> None:
        """Stop the worker thread (idempotent). The engine runs LoRA in place afterwards."""
        if self.worker is not None:
            self.worker.close()
        self.worker, self.torch_threads = None, None


def choose(mode: str, native: bool, runner: ModelRunner, rows: int, adapters: int, chunk: int,
           kernel: str) -> Overlap:  # fmt: skip
    """The side worker for an engine whose `runner` is built (with no side worker), if any, and the thread count
    for the engine's steps (one fewer than now when `auto` gives the side thread a core). `native`: the engine
    runs CPU float32 on the native kernel (`kernel` auto or native). Leaves PyTorch's thread count as it was."""
    if mode == "on" and not (native and native_lora.available()):
        reason = native_lora.unavailable_reason() or "it needs CPU float32 and lora_kernel auto or native"
        raise ValueError(f"engine.lora_overlap 'on': {reason}")
    threads = torch.get_num_threads()
    if mode == "off" or not native or (mode == "auto" and threads < 2) or not native_lora.available():
        return Overlap()
    if mode == "on":
        return Overlap(SideWorker())  # PyTorch's threads left as the user set them
    config = runner.model.config
    rows, chunk = min(rows, PROBE_ROWS), min(chunk, PROBE_CHUNK)
    adapters = min(adapters, rows)
    key = (config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.num_attention_heads,
           config.num_key_value_heads, config.vocab_size, rows, adapters, chunk, threads)  # fmt: skip
    if key not in _decisions:
        _decisions[key] = _measure(runner, rows, adapters, chunk, kernel, threads)
    if not _decisions[key]:
        return Overlap()
    return Overlap(SideWorker(), threads - 1)


def _measure(runner: ModelRunner, rows: int, adapters: int, chunk: int, kernel: str, threads: int) -> bool:
    """True if what PyTorch gains from its last thread (base step) is less than the part of the LoRA's cost (in
    place, on all threads) that the side thread would hide (HIDDEN_SHARE), both relative to the base step."""
    base = _probe(runner, rows, adapters, chunk, kernel, with_lora=False)
    lora = _probe(runner, rows, adapters, chunk, kernel, with_lora=True)
    start = time.perf_counter()
    lora()  # (also a warm-up)
    if time.perf_counter() - start > MAX_PROBE_S:
        log.info("LoRA side thread off: a probe forward took %.1f s (PyTorch's threads pay at this size)",
                 time.perf_counter() - start)  # fmt: skip
        return False
    blocks, passes = (2, 1) if time.perf_counter() - start > SLOW_PROBE_S else (BLOCKS, BLOCK_PASSES)
    ways = (("base", threads - 1, base), ("base", threads, base), ("lora", threads, lora))
    seconds: dict[tuple[str, int], list[float]] = {(name, count): [] for name, count, _ in ways}
    try:
        for _ in range(blocks):
            for name, count, probe in ways:
                torch.set_num_threads(count)
                time.sleep(SETTLE_S)  # let PyTorch's spinning pool threads go to sleep
                probe()
                start = time.perf_counter()
                for _ in range(passes):
                    probe()
                seconds[name, count].append((time.perf_counter() - start) / passes)
    finally:
        torch.set_num_threads(threads)
    # per block (paired: a drifting machine hits all three alike)
    gains = [b1 / b - 1 for b1, b in zip(seconds["base", threads - 1], seconds["base", threads], strict=True)]
    costs = [lo / b - 1 for b, lo in zip(seconds["base", threads], seconds["lora", threads], strict=True)]
    gain, cost = statistics.median(gains), statistics.median(costs)
    side = gain < HIDDEN_SHARE * cost
    log.info("LoRA side thread %s: the base step is %.0f%% faster on %d PyTorch threads than on %d; LoRA in place adds "
             "%.0f%% to it", "on" if side else "off", 100 * gain, threads, threads - 1, 100 * cost)  # fmt: skip
    return side


def _probe(runner: ModelRunner, rows: int, adapters: int, chunk: int, kernel: str,
           with_lora: bool) -> Callable[[], None]:  # fmt: skip
    """One decode step of `rows` rows and one prefill chunk of `chunk` tokens, on the engine's own (still empty)
    paged KV cache and slot bank: the base alone, or with LoRA on every row (decode rows round-robin
    over `adapters` slots; zero weights cost what real ones do). A serving step minus the scheduling."""
    kv = runner.kv
    device = kv.k.device
    position = min(chunk, kv.max_len - 1)
    tokens = torch.zeros(rows, dtype=torch.long, device=device)
    positions = torch.full((rows,), position, dtype=torch.long, device=device)
    prompt = torch.zeros(min(chunk, kv.max_len), dtype=torch.long, device=device)
    table = list(range(-(-kv.max_len // kv.block_size)))  # every row on the same blocks: a probe, nothing to keep
    decode_attention = DecodeAttention.build(kv, [table] * rows, [position + 1] * rows, None, device)
    prefill_attention = PrefillAttention.build(kv, [(table, 0, prompt.shape[0])], device)
    decode_plan = prefill_plan = None
    if with_lora:
        storage = runner.bank.storage
        decode_plan = LoraBatch(torch.tensor([1 + i % adapters for i in range(rows)], device=device), storage, kernel)
        prefill_plan = LoraBatch(torch.tensor([1], device=device), storage, kernel)
    last = torch.tensor([prompt.shape[0] - 1], device=device)

    def probe() -> None:
        runner.decode(tokens, positions, decode_plan, decode_attention)
        runner.prefill(prompt, torch.arange(prompt.shape[0], device=device), prefill_plan, prefill_attention, last)

    return probe
