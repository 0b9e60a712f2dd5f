"""Paged KV building blocks (issue 22; the engine on them: tests/test_engine_paged.py): the block manager
(serve_app/engine/block_manager.py) and the Triton paged-attention decode kernel (serve_app/engine/paged_attention.py),
the kernel on CPU in a subprocess under the Triton interpreter (tests/paged_attention_cases.py) and, marked `gpu`, on
CUDA.

    .venv/bin/python -m pytest -q tests/test_paged_kv.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from paged_attention_cases import CASES, problems, run_case

from serve_app.engine.block_manager import BlockManager, OutOfBlocks
from serve_app.engine.paged_kv import PagedKV
from serve_app.engine.scheduler import Scheduler
from serve_app.engine.sequence import SamplingParams, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]


# -- block manager ------------------------------------------------------------------------------------------------
def test_finished_sequences_blocks_are_reused_and_nobody_else_moves() -> None:
    manager = BlockManager(num_blocks=8, block_size=4)
    a, b = manager.allocate("a", 9), manager.allocate("b", 4)
    assert a == [0, 1, 2] and b == [3] and manager.num_free == 4
    assert manager.free("a") == 3 and manager.num_free == 7
    assert manager.table("b") == [3]  # no compaction: b's blocks and slots are where they were
    c = manager.allocate("c", 12)
    assert c == [0, 1, 2]  # a's blocks, reused last-freed first
    assert set(c).isdisjoint(manager.table("b"))


def test_append_takes_a_new_block_only_at_a_block_boundary() -> None:
    manager = BlockManager(num_blocks=4, block_size=4)
    manager.allocate("s", 3)
    assert manager.append_slot("s") == 3 and manager.table("s") == [0]  # position 3 still fits block 0
    assert manager.append_slot("s") == 4 and manager.table("s") == [0, 1]  # position 4 opens block 1
    assert manager.length("s") == 5
    assert manager.slots("s", 0, 5) == [0, 1, 2, 3, 4]
    manager.allocate("t", 8)  # blocks 2, 3
    with pytest.raises(OutOfBlocks):
        manager.allocate("u", 1)
    for _ in range(3):
        manager.append_slot("s")
    with pytest.raises(OutOfBlocks, match="no free block"):
        manager.append_slot("s")  # s is at 8 tokens in 2 full blocks, none free


def test_slots_follow_the_block_table() -> None:
    manager = BlockManager(num_blocks=6, block_size=4)
    manager.allocate("x", 4)  # block 0
    manager.allocate("y", 2)  # block 1
    manager.append_slot("x")  # position 4 of x -> block 2
    assert manager.table("x") == [0, 2]
    assert manager.slot("x", 4) == 2 * 4 + 0 and manager.slot("y", 1) == 1 * 4 + 1
    with pytest.raises(IndexError):
        manager.slot("y", 2)
    tables, lengths = manager.block_tables(["x", "y"])
    assert tables.tolist() == [[0, 2], [1, 0]] and lengths.tolist() == [5, 2]
    assert tables.dtype == lengths.dtype == torch.int32


def test_preemption_frees_the_lowest_priority_sequences_until_the_rest_fit() -> None:
    manager = BlockManager(num_blocks=5, block_size=2)
    for name in ("old", "mid", "new"):
        manager.allocate(name, 2)  # each exactly one full block: each needs a new block for its next token
    assert manager.num_free == 2
    assert manager.reserve_decode(["old", "mid", "new"]) == ["new"]
    assert not manager.has("new") and manager.num_free == 3
    for name in ("old", "mid"):
        manager.append_slot(name)  # both fit now
    assert manager.reserve_decode(["old", "mid"]) == []  # room left in their blocks: nothing to do


def test_preemption_can_take_several_sequences_and_leaves_the_first() -> None:
    manager = BlockManager(num_blocks=3, block_size=2)
    for name in ("a", "b", "c"):
        manager.allocate(name, 2)
    assert manager.reserve_decode(["a", "b", "c"]) == ["c", "b"]  # freeing c alone leaves 1 block for a and b
    assert manager.append_slot("a") == manager.table("a")[1] * 2


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        BlockManager(num_blocks=4, block_size=6)
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(num_blocks=0, block_size=4)
    manager = BlockManager(num_blocks=4, block_size=4)
    manager.allocate("a", 1)
    with pytest.raises(ValueError, match="already has blocks"):
        manager.allocate("a", 1)


# -- the engine's paged KV cache and admission by free blocks -----------------------------------------------------
def test_reserve_preempts_the_youngest_running_sequences_including_ones_still_in_prefill() -> None:
    kv = PagedKV(num_layers=1, num_blocks=4, block_size=16, num_kv_heads=1, head_dim=4, max_len=64,
                 dtype=torch.float32, device="cpu")  # fmt: skip
    kv.allocate("old", 16)  # decoding, its block full: needs a new one
    kv.allocate("mid", 8)  # decoding, room left in its block
    kv.allocate("young", 32)  # still in prefill, holding two blocks
    assert kv.num_free == 0
    assert kv.reserve(["old", "mid"], ["old", "mid", "young"]) == ["young"]  # the prefilling one goes first
    assert kv.num_free == 2 and kv.table("old") == [0] and kv.table("mid") == [1]  # nobody else moved
    assert kv.reserve(["old", "mid"], ["old", "mid"]) == []
    kv.append("old")
    kv.free("old")
    kv.free("mid")
    assert kv.num_free == 4


def _seq(rid: str, adapter: str | None, prompt: int) -> Sequence:
    return Sequence(rid, [1] * prompt, SamplingParams(), adapter, detokenizer=None)  # type: ignore[arg-type]


def test_admission_stops_at_the_first_prompt_that_does_not_fit_and_preempted_ones_go_first() -> None:
    kv = PagedKV(num_layers=1, num_blocks=4, block_size=16, num_kv_heads=1, head_dim=4, max_len=64,
                 dtype=torch.float32, device="cpu")  # fmt: skip
    scheduler = Scheduler(max_loras=4, starvation_s=10.0)
    for seq in (_seq("a1", "a", 40), _seq("b1", "b", 30), _seq("a2", "a", 5)):
        scheduler.add(seq)

    def fits(seq: Sequence) -> bool:
        return kv.can_hold(seq.prefill_target)

    def take(seq: Sequence) -> None:
        kv.allocate(seq.request_id, seq.prefill_target)

    admitted = scheduler.schedule(8, set(), lambda _: True, fits=fits, on_admit=take)
    assert [s.request_id for s in admitted] == ["a1"]  # b1 (2 blocks) does not fit in 1: a2 does not overtake it
    assert scheduler.waiting_count == 2 and kv.num_free == 1
    kv.free("a1")
    scheduler.add(admitted[0], front=True)  # preempted: recomputed before a2
    order = scheduler.schedule(8, set(), lambda _: True, fits=fits, on_admit=take)
    assert [s.request_id for s in order] == ["b1"]  # (round robin: b's turn) then a1's 3 blocks do not fit in 2
    assert [s.request_id for s in scheduler.waiting()] == ["a1", "a2"]


# -- the paged-attention decode kernel --------------------------------------------------------------------------
def _check(result: dict[str, Any]) -> None:
    assert not problems(result), (problems(result), result)


@pytest.fixture(scope="module")
def interpreted() -> dict[str, dict[str, Any]]:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "paged_attention_cases.py")], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {r["name"]: r for r in map(json.loads, proc.stdout.splitlines())}


@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_paged_decode_matches_sdpa_under_the_interpreter(interpreted, name: str) -> None:
    _check(interpreted[name])


def test_cases_really_interleave_and_reuse_blocks(interpreted) -> None:
    assert sum(r["blocks_interleaved"] for r in interpreted.values()) >= 3
    assert sum(r["reused_blocks"] for r in interpreted.values()) >= 3


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_paged_decode_matches_sdpa_on_cuda(case) -> None:
    _check(run_case(case, "cuda"))
