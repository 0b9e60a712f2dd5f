"""Time to first token and event-loop stalls under concurrent load: AsyncLoraEngine (commands on a queue drained
between steps) against the lock-around-the-step design it replaced (a copy of it below, `LockingAsyncEngine`).

Both wrap an engine of their own over the same base model, get the same clients in the same event loop, and run
in alternation (repeat i: one then the other, order flipped each repeat) so a drifting machine hits both alike.
Each client sends its requests one after another (random prompts, greedy, a fixed number of new tokens); a ticker
coroutine measures how late a 5 ms sleep wakes up (the event loop's stall, what every other request's token
delivery and a health check wait). Prints a markdown table with both designs and the gain (> 1: the command queue
is better; before / now for times, now / before for tokens/s).

    python -m bench.ttft_event_loop                      # tiny-llama, 12 clients x 8 requests, 5 repeats
    python -m bench.ttft_event_loop --clients 32 --requests-per-client 4 --json ttft.json   # slots full
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import itertools
import json
import os
import random
import statistics
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from typing import Any

import torch

from adapters.base_models import load_base
from serve_app.engine import EngineConfig, LoraEngine, SamplingParams, TokenOutput
from serve_app.engine.async_engine import AsyncLoraEngine

TICK_S = 0.005


class LockingAsyncEngine:
    """The design before issue 19 (serve_app/engine/async_engine.py at commit 6d91093), `generate` only: coroutines
    take the lock the step thread holds for a whole `engine.step()`."""

    def __init__(self, engine: LoraEngine) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[TokenOutput]]] = {}
        self._ids = itertools.count()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       adapter_id: str | None = None) -> AsyncIterator[TokenOutput]:  # fmt: skip
        request_id = f"req-{next(self._ids)}"
        queue: asyncio.Queue[TokenOutput] = asyncio.Queue()
        with self._lock:
            self.engine.add_request(request_id, prompt_ids, params, adapter_id)
            self._streams[request_id] = (asyncio.get_running_loop(), queue)
        self._wake.set()
        finished = False
        try:
            while not finished:
                out = await queue.get()
                finished = out.finished
                yield out
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                with self._lock:
                    self.engine.abort(request_id)

    def _loop(self) -> None:
        while not self._stopped:
            with self._lock:
                busy = self.engine.has_work()
                if busy:
                    outputs = self.engine.step()
            if not busy:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            for out in outputs:
                target = self._streams.get(out.request_id)
                if target is not None:
                    target[0].call_soon_threadsafe(target[1].put_nowait, out)

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=5)


@dataclass
class Run:
    design: str
    ttft_p50_ms: float
    ttft_p99_ms: float
    stall_p99_ms: float
    stall_max_ms: float
    tokens_per_s: float


def _quantile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


async def _drive(engine: Any, prompts: list[list[int]], clients: int, max_tokens: int) -> tuple[list[float], list[float], int, float]:  # fmt: skip
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    ttfts: list[float] = []
    stalls: list[float] = []
    done = asyncio.Event()
    per_client = len(prompts) // clients

    async def ticker() -> None:
        while not done.is_set():
            start = time.perf_counter()
            await asyncio.sleep(TICK_S)
            stalls.append(time.perf_counter() - start - TICK_S)

    async def client(index: int) -> int:
        tokens = 0
        for prompt in prompts[index * per_client : (index + 1) * per_client]:
            start = time.perf_counter()
            first = True
            async for _ in engine.generate(prompt, params):
                if first:
                    ttfts.append(time.perf_counter() - start)
                    first = False
                tokens += 1
        return tokens

    async def all_clients() -> int:
        counts = await asyncio.gather(*(client(i) for i in range(clients)))
        done.set()
        return sum(counts)

    start = time.perf_counter()
    _, tokens = await asyncio.gather(ticker(), all_clients())
    return ttfts, stalls, tokens, time.perf_counter() - start


def run_one(design: str, base: Any, config: EngineConfig, prompts: list[list[int]], clients: int,
            max_tokens: int) -> Run:  # fmt: skip
    engine = LoraEngine(base, config)
    wrapped = AsyncLoraEngine(engine) if design == "queue" else LockingAsyncEngine(engine)
    try:
        ttfts, stalls, tokens, seconds = asyncio.run(_drive(wrapped, prompts, clients, max_tokens))
    finally:
        wrapped.shutdown()
        engine.close()
    assert tokens == len(prompts) * max_tokens, (tokens, len(prompts), max_tokens)
    return Run(design, 1e3 * _quantile(ttfts, 50), 1e3 * _quantile(ttfts, 99), 1e3 * _quantile(stalls, 99),
               1e3 * max(stalls), tokens / seconds)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="tiny-llama")
    parser.add_argument(
        "--clients", type=int, default=12, help="at most --max-running: TTFT is admission, not a slot wait"
    )
    parser.add_argument("--requests-per-client", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-running", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lora-overlap", choices=["auto", "on", "off"], default="auto", help="engine.lora_overlap")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write every run here")
    args = parser.parse_args()
    base = load_base(args.base, device="cpu")
    rng = random.Random(args.seed)
    vocab = base.model.config.vocab_size
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(16, 64))]
               for _ in range(args.clients * args.requests_per_client)]  # fmt: skip
    config = EngineConfig(device="cpu", max_running=args.max_running, max_seq_len=64 + args.max_tokens + 1,
                          max_queue=len(prompts) + 1, max_loras=1, lora_overlap=args.lora_overlap)  # fmt: skip
    gc.collect()
    gc.freeze()
    runs: list[Run] = []
    for repeat in range(args.repeats):
        for design in ("lock", "queue") if repeat % 2 == 0 else ("queue", "lock"):
            runs.append(run_one(design, base, config, prompts, args.clients, args.max_tokens))
            print(f"# repeat {repeat + 1}: {runs[-1]}", flush=True)
    fields = ("ttft_p50_ms", "ttft_p99_ms", "stall_p99_ms", "stall_max_ms", "tokens_per_s")
    median = {d: {f: statistics.median(getattr(r, f) for r in runs if r.design == d) for f in fields}
              for d in ("lock", "queue")}  # fmt: skip
    print(f"\n{args.base}, {args.clients} clients x {args.requests_per_client} requests, {args.max_tokens} new tokens, "
          f"max_running {args.max_running}, lora_overlap {args.lora_overlap}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}, "
          f"{dt.date.today().isoformat()}; medians of {args.repeats} runs each\n")  # fmt: skip
    print("| design | TTFT p50 ms | TTFT p99 ms | loop stall p99 ms | loop stall max ms | tokens/s |")
    print("|---|---|---|---|---|---|")
    labels = {"lock": "lock around the step (before)", "queue": "command queue (now)"}
    for design in ("lock", "queue"):
        m = median[design]
        print(f"| {labels[design]} | " + " | ".join(f"{m[f]:,.1f}" for f in fields) + " |")
    # > 1 means the command queue is better: before / now for times, now / before for tokens/s
    gain = {f: (median["queue"][f] / median["lock"][f] if f == "tokens_per_s" else median["lock"][f] / median["queue"][f])
            if median["queue"][f] and median["lock"][f] else float("nan") for f in fields}  # fmt: skip
    print("| gain (> 1: now better) | " + " | ".join(f"{gain[f]:.2f}x" for f in fields) + " |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "runs": [asdict(r) for r in runs], "median": median}, fh, indent=1)


if __name__ == "__main__":
    main()
