"""Admission: which waiting requests join the running batch at the next step.

Rules, in order:
  1. room for one more running sequence (`max_running`), and free KV blocks for its prompt (`fits`): when the
     oldest candidate does not fit, admission stops for this step (it is not overtaken by smaller prompts);
  2. at most `max_loras` distinct adapters running at once (they must fit the device slots), so when the cap binds
     requests for adapters already running are preferred: they batch with no new slot;
  3. fairness: one request per adapter queue per round-robin pass, so a hot adapter cannot crowd out the others;
  4. no starvation: if an adapter has waited longer than `starvation_s` for a device slot, new requests of the
     running adapters stop being admitted until one of them drains and frees its slot.
Requests without an adapter (the base model) never need a slot and only wait for rule 1.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable

from serve_app.engine.sequence import Sequence


class Scheduler:
    def __init__(self, max_loras: int, starvation_s: float) -> None:
        self.max_loras = max_loras
        self.starvation_s = starvation_s
        self._queues: OrderedDict[str, deque[Sequence]] = OrderedDict()  # adapter key -> FIFO; order = round robin
        self.waiting_count = 0

    def add(self, seq: Sequence, front: bool = False) -> None:
        """Queue a request; `front`: ahead of its adapter's queue (a preempted sequence, to be recomputed first)."""
        queue = self._queues.setdefault(seq.adapter_key, deque())
        queue.appendleft(seq) if front else queue.append(seq)
        self.waiting_count += 1

    def remove(self, request_id: str) -> Sequence | None:
        for key, queue in self._queues.items():
            for seq in queue:
                if seq.request_id == request_id:
                    queue.remove(seq)
                    self.waiting_count -= 1
                    if not queue:
                        del self._queues[key]
                    return seq
        return None

    def waiting(self) -> list[Sequence]:
        return [seq for queue in self._queues.values() for seq in queue]

    def waiting_for(self, adapter_key: str) -> int:
        return len(self._queues.get(adapter_key, ()))

    def schedule(
        self,
        free_slots: int,
        running_adapters: set[str],
        can_place: Callable[[str], bool],
        now: float | None = None,
        fits: Callable[[Sequence], bool] | None = None,
        on_admit: Callable[[Sequence], object] | None = None,
    ) -> list[Sequence]:
        """Pop and return the sequences to admit now. `running_adapters` excludes the base (''); `can_place(a)`
        says whether adapter `a` could get a device slot (free, or an idle adapter to evict); `fits(seq)` whether
        its KV blocks are free (False stops admission), `on_admit(seq)` takes them (before the next candidate)."""
        now = time.monotonic() if now is None else now
        admitted: list[Sequence] = []
        active = set(running_adapters)
        starving = any(
            key and key not in active and queue[0].arrival + self.starvation_s < now and len(active) >= self.max_loras
            for key, queue in self._queues.items()
        )
        progress = True
        while free_slots > 0 and progress and self._queues:
            progress = False
            for key in list(self._queues):
                if free_slots == 0:
                    break
                queue = self._queues[key]
                if key:
                    is_new = key not in active
                    if is_new and (len(active) >= self.max_loras or not can_place(key)):
                        continue
                    if not is_new and starving:
                        continue  # let running adapters drain so a starving one gets a slot
                if fits is not None and not fits(queue[0]):
                    return admitted  # out of KV blocks: nobody overtakes the candidate
                if key:
                    active.add(key)
                if on_admit is not None:
                    on_admit(queue[0])
                admitted.append(queue.popleft())
                self.waiting_count -= 1
                free_slots -= 1
                progress = True
                # move this adapter to the back of the round robin
                self._queues.move_to_end(key)
                if not queue:
                    del self._queues[key]
        return admitted
