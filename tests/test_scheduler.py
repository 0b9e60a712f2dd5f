"""Admission rules: slots, the distinct-adapter cap, round-robin fairness, and no starvation."""

from __future__ import annotations

from serve_app.engine.scheduler import Scheduler
from serve_app.engine.sequence import SamplingParams, Sequence


def _seq(rid: str, adapter: str | None, arrival: float = 0.0) -> Sequence:
    return Sequence(rid, [1], SamplingParams(), adapter, detokenizer=None, arrival=arrival)  # type: ignore[arg-type]


def _ids(seqs: list[Sequence]) -> list[str]:
    return [s.request_id for s in seqs]


def test_round_robin_keeps_a_hot_adapter_from_crowding_out_others() -> None:
    sched = Scheduler(max_loras=8, starvation_s=10)
    for i in range(6):
        sched.add(_seq(f"hot{i}", "hot"))
    sched.add(_seq("cold0", "cold"))
    sched.add(_seq("base0", None))
    admitted = _ids(sched.schedule(3, set(), lambda _: True, now=0))
    assert admitted == ["hot0", "cold0", "base0"]
    assert sched.waiting_count == 5


def test_cap_prefers_adapters_already_running() -> None:
    sched = Scheduler(max_loras=2, starvation_s=10)
    sched.add(_seq("c0", "c"))
    sched.add(_seq("a1", "a"))
    sched.add(_seq("a2", "a"))
    admitted = _ids(sched.schedule(10, {"a", "b"}, lambda _: True, now=0))
    assert admitted == ["a1", "a2"]  # "c" would be a third adapter
    assert _ids(sched.waiting()) == ["c0"]


def test_unplaceable_adapter_waits_but_base_rows_go() -> None:
    sched = Scheduler(max_loras=4, starvation_s=10)
    sched.add(_seq("x0", "x"))
    sched.add(_seq("b0", None))
    assert _ids(sched.schedule(4, set(), lambda a: a != "x", now=0)) == ["b0"]


def test_starving_adapter_stops_admissions_of_running_ones() -> None:
    sched = Scheduler(max_loras=1, starvation_s=1.0)
    sched.add(_seq("late", "b", arrival=0.0))
    sched.add(_seq("hot", "a", arrival=0.5))
    # before the deadline the running adapter keeps batching
    assert _ids(sched.schedule(4, {"a"}, lambda _: True, now=0.5)) == ["hot"]
    sched.add(_seq("hot2", "a", arrival=1.5))
    # past the deadline: "a" must drain, nothing new is admitted for it
    assert _ids(sched.schedule(4, {"a"}, lambda _: True, now=2.0)) == []
    # once "a" has drained, "b" gets in first
    assert _ids(sched.schedule(4, set(), lambda _: True, now=2.1))[0] == "late"


def test_remove_waiting_request() -> None:
    sched = Scheduler(max_loras=2, starvation_s=1)
    sched.add(_seq("r1", "a"))
    assert sched.remove("r1") is not None and sched.waiting_count == 0 and sched.remove("r1") is None
