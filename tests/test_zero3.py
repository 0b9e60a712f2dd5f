"""DeepSpeed ZeRO-3 with 2 real CPU workers (gloo, DeepSpeed's CPU accelerator), through `jobs.train_loop.train`:
the base is sharded while it loads (no rank ever holds a whole weight), every rank's optimizer shard lands in the
checkpoint, a run resumed from it ends with exactly the adapter of the uninterrupted run, the adapter is saved from
gathered (full-shape) parameters, and rank 0 evaluates on a fresh unsharded base.

The first use of DeepSpeed's CPU accelerator JIT-builds its shared-memory comm op with g++ (cached afterwards in
~/.cache/torch_extensions)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adapters.lora_files import WEIGHTS_FILE

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="the [deepspeed] extra is not installed"),
]


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import free_port

    out = tmp_path_factory.mktemp("zero3")
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}  # fmt: skip
        log = open(out / f"log{rank}.txt", "w")  # noqa: SIM115
        procs.append((subprocess.Popen([sys.executable, str(ROOT / "tests" / "zero3_worker.py"), str(out)],
                                       env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT), log))  # fmt: skip
    try:
        for proc, _ in procs:
            proc.wait(timeout=600)
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    for rank, (proc, _) in enumerate(procs):
        tail = (out / f"log{rank}.txt").read_text()[-3000:]
        assert proc.returncode == 0, f"rank {rank} failed:\n{tail}"
    return out


def test_the_base_is_sharded_from_the_start(zero3_run: Path) -> None:
    for rank in (0, 1):
        seen = json.loads((zero3_run / f"rank{rank}.json").read_text())
        assert seen["base_full_shape"] == [64, 160]  # the tiny Llama's down_proj
        assert seen["base_local_numel"] == 0  # a ZeRO-3 placeholder right after from_pretrained: never whole


def test_every_ranks_state_is_checkpointed_and_resuming_equals_the_straight_run(zero3_run: Path) -> None:
    state = zero3_run / "ckpt-step2" / "deepspeed" / "state"
    files = {p.name for p in state.iterdir()}
    assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= files
    straight = load_file(str(zero3_run / "straight" / WEIGHTS_FILE))
    resumed = load_file(str(zero3_run / "resumed" / WEIGHTS_FILE))
    at_checkpoint = load_file(str(zero3_run / "ckpt-step2" / WEIGHTS_FILE))
    assert straight.keys() == resumed.keys() == at_checkpoint.keys() and straight
    assert all(torch.allclose(straight[k], resumed[k], atol=1e-6) for k in straight)
    assert any(not torch.allclose(straight[k], at_checkpoint[k]) for k in straight)  # steps 3-4 changed weights
    for rank in (0, 1):
        seen = json.loads((zero3_run / f"rank{rank}.json").read_text())
        assert seen["straight"]["steps"] == seen["resumed"]["steps"] == 4
        assert seen["straight"]["loss"] == pytest.approx(seen["resumed"]["loss"], rel=1e-6)


def test_the_adapter_is_gathered_and_rank0_evaluates_on_a_fresh_base(zero3_run: Path) -> None:
    weights = load_file(str(zero3_run / "straight" / WEIGHTS_FILE))
    down_a = next(v for k, v in weights.items() if "layers.0.mlp.down_proj.lora_A" in k)
    down_b = next(v for k, v in weights.items() if "layers.0.mlp.down_proj.lora_B" in k)
    assert tuple(down_a.shape) == (4, 160) and tuple(down_b.shape) == (64, 4)  # full shapes, not one rank's shard
    assert down_b.abs().sum() > 0  # trained (LoRA B starts at zero)
    rank0 = json.loads((zero3_run / "rank0.json").read_text())["straight"]
    rank1 = json.loads((zero3_run / "rank1.json").read_text())["straight"]
    assert 0.0 <= rank0["adapter_score"] <= 100.0 and math.isnan(rank1["adapter_score"])
    assert "ZeRO-3: rank 0 evaluates on a fresh unsharded copy of tiny-llama" in (zero3_run / "log0.txt").read_text()
