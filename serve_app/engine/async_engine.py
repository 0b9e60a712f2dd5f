"""AsyncLoraEngine: the engine's step loop on a background thread, streaming tokens to asyncio callers.

Any number of coroutines call `generate(...)`; their requests join the running batch between steps (continuous
batching). Only the step thread touches the engine: requests, aborts and adapter loads/unloads are commands on a
thread-safe queue that it drains between steps, and `stats()` reads the snapshot it publishes after each step. So
no coroutine ever waits for a step, and the event loop (other requests' tokens, health checks, metrics) keeps
running while one is computed (tests/test_async_engine.py). If a step raises, every in-flight request ends with an
error and the loop keeps serving new requests. A caller that stops iterating (client disconnected) aborts its
request, freeing its slot at the next step.

    python -m bench.ttft_event_loop      # time to first token under load: this design vs. a lock around the step
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from adapters.lora_files import LoraWeights, read_lora
from serve_app.engine.engine import EngineStats, LoraEngine
from serve_app.engine.sequence import SamplingParams, TokenOutput

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.5  # an idle step thread re-checks `stop` this often (a command wakes it at once)

# What a stream's queue receives: a token, or the exception that refused the request before its first token.
Item = TokenOutput | BaseException
Command = Callable[[LoraEngine], None]


class AsyncLoraEngine:
    def __init__(self, engine: LoraEngine) -> None:
        self.engine = engine  # touched only by the step thread once it runs (and read-only attributes by others)
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[Item]]] = {}
        self._ids = itertools.count()
        self._stats: EngineStats = engine.stats()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="lora-engine", daemon=True)
        self._thread.start()

    def _submit(self, command: Command) -> None:
        """Run `command(engine)` on the step thread before its next step. Never blocks."""
        self._commands.put(command)
        self._wake.set()

    async def _call(self, command: Callable[[LoraEngine], object]) -> object:
        """Run `command(engine)` on the step thread; await its result (or its exception) without blocking."""
        future: concurrent.futures.Future[object] = concurrent.futures.Future()

        def run(engine: LoraEngine) -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(command(engine))
                except BaseException as err:  # handed to the awaiting coroutine
                    future.set_exception(err)

        self._submit(run)
        return await asyncio.wrap_future(future)

    # -- adapters ---------------------------------------------------------------------------------------------
    async def load_adapter(self, adapter_id: str, folder: Path | str) -> LoraWeights:
        """Read + validate off the event loop, then register between steps. Raises AdapterRejected with the reason."""
        engine = self.engine
        weights = await asyncio.to_thread(read_lora, folder, engine.shapes, engine.config.max_lora_rank)
        return await self._call(lambda e: e.register_adapter(adapter_id, weights))  # type: ignore[return-value]

    def unload_adapter(self, adapter_id: str) -> None:
        """Forget an adapter between steps (after the requests already queued that use it). Returns at once."""
        self._submit(lambda e: e.unregister_adapter(adapter_id))

    def stats(self) -> EngineStats:
        """The engine's counters as of its last step or command (published by the step thread; never waits)."""
        return self._stats

    # -- requests ---------------------------------------------------------------------------------------------
    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, adapter_id: str | None = None
    ) -> AsyncIterator[TokenOutput]:
        """Yield TokenOutputs until one has `finished`. Raises RequestRejected before the first yield."""
        request_id = f"req-{next(self._ids)}"
        stream: asyncio.Queue[Item] = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        self._submit(lambda e: self._add(e, request_id, list(prompt_ids), params, adapter_id))
        finished = False
        try:
            while not finished:
                item = await stream.get()
                if isinstance(item, BaseException):
                    finished = True  # refused: nothing to abort
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._submit(lambda e: e.abort(request_id))

    def _add(self, engine: LoraEngine, request_id: str, prompt_ids: list[int], params: SamplingParams,
             adapter_id: str | None) -> None:  # fmt: skip
        """On the step thread: add the request, or hand the caller the reason it was refused."""
        try:
            engine.add_request(request_id, prompt_ids, params, adapter_id)
        except Exception as err:  # RequestRejected (or a bug): raised in the caller, before its first token
            self._deliver([(request_id, err)])

    # -- the step loop ------------------------------------------------------------------------------------------
    def _drain(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                command(self.engine)
            except Exception:  # commands report their own errors; one that escapes must not stop the loop
                log.exception("engine command failed")

    def _loop(self) -> None:
        engine = self.engine
        while not self._stopped:
            self._wake.clear()
            self._drain()
            if not engine.has_work():
                self._stats = engine.stats()
                self._wake.wait(timeout=IDLE_WAIT_S)
                continue
            try:
                outputs = engine.step()
            except Exception as err:  # a bug or OOM must not take the replica down
                log.exception("engine step failed; failing in-flight requests")
                outputs = engine.fail_all(f"engine error: {type(err).__name__}")
            self._stats = engine.stats()  # before the tokens go out: a caller that saw its last token sees it done
            self._deliver([(out.request_id, out) for out in outputs])

    def _deliver(self, items: list[tuple[str, Item]]) -> None:
        """Hand items to their streams: one call into each event loop per step, whatever the batch size."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Item], Item]]] = {}
        for request_id, item in items:
            target = self._streams.get(request_id)
            if target is not None:
                by_loop.setdefault(target[0], []).append((target[1], item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # that caller's loop is closed: nobody is listening
                pass

    def shutdown(self) -> None:
        """Stop the step thread (after its current step), then the engine's LoRA side thread, if any."""
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self.engine.close()


def _put_all(batch: list[tuple[asyncio.Queue[Item], Item]]) -> None:
    for stream, item in batch:
        stream.put_nowait(item)
