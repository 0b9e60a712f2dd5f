"""AsyncLoraEngine: the engine's step loop on a background thread, streaming tokens to asyncio callers.

Any number of coroutines call `generate(...)`; their requests join the running batch between steps (continuous
batching). A lock serialises engine calls from the event loop and the step thread. If a step raises, every
in-flight request ends with an error and the loop keeps serving new requests. A caller that stops iterating
(client disconnected) aborts its request, freeing its slot at the next step.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections.abc import AsyncIterator
from pathlib import Path

from adapters.lora_files import LoraWeights, read_lora
from serve_app.engine.engine import LoraEngine
from serve_app.engine.sequence import SamplingParams, TokenOutput

log = logging.getLogger(__name__)


class AsyncLoraEngine:
    def __init__(self, engine: LoraEngine) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[TokenOutput]]] = {}
        self._ids = itertools.count()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="lora-engine", daemon=True)
        self._thread.start()

    # -- adapters (thread-safe) ---------------------------------------------------------------------------------
    async def load_adapter(self, adapter_id: str, folder: Path | str) -> LoraWeights:
        """Read + validate off the event loop, then register. Raises AdapterRejected with the reason."""
        engine = self.engine
        weights = await asyncio.to_thread(read_lora, folder, engine.shapes, engine.config.max_lora_rank)
        with self._lock:
            return engine.register_adapter(adapter_id, weights)

    def unload_adapter(self, adapter_id: str) -> None:
        with self._lock:
            self.engine.unregister_adapter(adapter_id)

    def stats(self):
        with self._lock:
            return self.engine.stats()

    # -- requests -----------------------------------------------------------------------------------------------
    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, adapter_id: str | None = None
    ) -> AsyncIterator[TokenOutput]:
        """Yield TokenOutputs until one has `finished`. Raises RequestRejected before the first yield."""
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

    # -- the step loop --------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopped:
            with self._lock:
                busy = self.engine.has_work()
                if busy:
                    try:
                        outputs = self.engine.step()
                    except Exception as err:  # a bug or OOM must not take the replica down
                        log.exception("engine step failed; failing in-flight requests")
                        outputs = self.engine.fail_all(f"engine error: {type(err).__name__}")
            if not busy:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            for out in outputs:
                target = self._streams.get(out.request_id)
                if target is not None:
                    loop, queue = target
                    loop.call_soon_threadsafe(queue.put_nowait, out)

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=5)
