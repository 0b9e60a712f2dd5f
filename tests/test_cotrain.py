"""Co-training on the tiny model, without Ray: each co-trained adapter is the same training as its solo run (loss
curve and final weights), a resumed group equals an uninterrupted one, early stop and unequal step counts stay per
adapter, and the operator's differentiable form agrees with the per-row reference, gradients included.

    pytest tests/test_cotrain.py
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adapters.batched_lora import LoraBatch
from adapters.lora_files import WEIGHTS_FILE, read_config
from adapters.lora_reference import expand_reference, shrink_reference
from jobs.config import SweepConfig, TrialSpec
from jobs.cotrain_loop import cotrain
from jobs.train_loop import train

LOSS_RTOL = 2e-4
WEIGHT_ATOL = 2e-5


class Recorder:
    """Solo and group hooks in one: metric lines per adapter, and copies of checkpoints."""

    def __init__(self, name: str = "", keep: Path | None = None) -> None:
        self.name, self.keep = name, keep
        self.metrics: dict[str, dict[int, dict[str, float]]] = {}
        self.checkpoints: list[Path] = []

    def log(self, *args) -> None:
        adapter, step, metrics = args if len(args) == 3 else (self.name, *args)
        self.metrics.setdefault(adapter, {}).setdefault(step, {}).update(metrics)

    def checkpoint(self, index: int, folder: Path | None, metrics: dict[str, float]) -> None:
        if self.keep is not None and folder is not None:
            self.checkpoints.append(Path(shutil.copytree(folder, self.keep / f"round-{index}")))

    def losses(self, adapter: str) -> list[float]:
        steps = self.metrics[adapter]
        return [steps[s]["loss"] for s in sorted(steps) if "loss" in steps[s]]


def _spec(task: str, name: str, lora: dict, **training) -> TrialSpec:
    config = SweepConfig(name="co", base_model="tiny-llama", tasks=[task], lora={"dropout": 0.0, **lora},
                         training={"max_steps": 6, "micro_batch_size": 3, "learning_rate": 2e-3, "warmup_steps": 1,
                                   "log_every": 1, "checkpoint_every": 3, "max_seq_len": 512, **training},
                         evaluation={"max_examples": 4, "quick_examples": 4, "max_new_tokens": 4, "batch_size": 8})  # fmt: skip
    return config.trials()[0].model_copy(update={"adapter_name": name})


def _group() -> list[TrialSpec]:
    """Three adapters that differ in task, rank, alpha, rsLoRA, targets, lr, seed, micro-batch, grad accumulation
    and length."""
    return [
        _spec("sentiment", "s-r4", {"r": 4, "alpha": 8}),
        _spec("viggo", "v-r8-qv", {"r": 8, "alpha": 32, "target_modules": ["q_proj", "v_proj"]},
              learning_rate=5e-3, micro_batch_size=2, grad_accum=2, seed=3),
        _spec("sentiment", "s-r2-short", {"r": 2, "alpha": 4, "use_rslora": True}, max_steps=4, seed=1,
              max_grad_norm=0.05),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def cotrained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Recorder, dict, Path]:
    out = tmp_path_factory.mktemp("cotrain")
    hooks = Recorder(keep=tmp_path_factory.mktemp("checkpoints"))
    outcomes = cotrain(_group(), hooks, out / "adapters")
    return hooks, outcomes, out


@pytest.mark.parametrize("index", [0, 1, 2])
def test_cotrained_adapter_equals_its_solo_run(index: int, cotrained, tmp_path: Path) -> None:
    hooks, outcomes, _ = cotrained
    spec = _group()[index]
    solo_hooks = Recorder(spec.adapter_name)
    solo = train(spec, solo_hooks, tmp_path / "solo")
    co = outcomes[spec.adapter_name]
    assert co.steps == solo.steps == spec.training.max_steps
    assert hooks.losses(spec.adapter_name) == pytest.approx(solo_hooks.losses(spec.adapter_name), rel=LOSS_RTOL)
    solo_w, co_w = load_file(str(tmp_path / "solo" / WEIGHTS_FILE)), load_file(str(co.adapter_dir / WEIGHTS_FILE))
    assert set(co_w) == set(solo_w)
    moved = 0.0
    for key, want in solo_w.items():
        torch.testing.assert_close(co_w[key], want, atol=WEIGHT_ATOL, rtol=1e-3, msg=key)
        moved = max(moved, float(want.abs().max()) if ".lora_B." in key else moved)
    assert moved > 1e-3  # B left zero: the comparison would be vacuous
    assert read_config(co.adapter_dir).model_dump() == read_config(tmp_path / "solo").model_dump()
    assert co.base_score == pytest.approx(solo.base_score)
    assert co.adapter_score == pytest.approx(solo.adapter_score)


def test_resumed_group_equals_uninterrupted(cotrained, tmp_path: Path) -> None:
    hooks, outcomes, _ = cotrained
    assert hooks.checkpoints, "the group never checkpointed"
    resumed_hooks = Recorder()
    resumed = cotrain(_group(), resumed_hooks, tmp_path / "adapters", resume=hooks.checkpoints[0])
    for name, outcome in outcomes.items():
        first = min(resumed_hooks.metrics[name])
        assert resumed_hooks.metrics[name][first]["resumed_from_step"] > 0
        assert resumed[name].steps == outcome.steps
        want, got = (
            load_file(str(outcome.adapter_dir / WEIGHTS_FILE)),
            load_file(str(resumed[name].adapter_dir / WEIGHTS_FILE)),
        )
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=1e-5, msg=key)


def test_early_stop_is_per_adapter_and_matches_solo(tmp_path: Path) -> None:
    evals = {"eval_every": 1, "early_stop_patience": 1, "max_steps": 10}
    wild = _spec("sentiment", "wild", {"r": 4, "alpha": 64}, learning_rate=1.0, max_grad_norm=None, **evals)
    calm = _spec("viggo", "calm", {"r": 4, "alpha": 8}, learning_rate=1e-3, max_steps=5)
    hooks = Recorder()
    outcomes = cotrain([wild, calm], hooks, tmp_path / "co")
    stopped = [s for s, m in hooks.metrics["wild"].items() if "early_stopped_at" in m]
    assert stopped and outcomes["wild"].steps == stopped[0] < 10
    assert outcomes["calm"].steps == 5
    solo = train(wild, Recorder("wild"), tmp_path / "solo")
    assert solo.steps == outcomes["wild"].steps


def test_config_refuses_cotrain_with_several_workers_per_adapter() -> None:
    with pytest.raises(ValueError, match="resources.workers_per_adapter"):
        SweepConfig(name="x", strategy="cotrain", resources={"workers_per_adapter": 2})
    with pytest.raises(ValueError, match="early_stop_patience needs eval_every"):
        SweepConfig(name="x", training={"early_stop_patience": 2})


def test_groups_chunk_trials_by_adapters_per_job() -> None:
    config = SweepConfig(name="g", base_model="tiny-llama", tasks=["sentiment", "viggo", "word_math"],
                         grid={"lora.r": [4, 8], "quantization.mode": ["none", "nf4"]}, strategy="cotrain",
                         adapters_per_job=4)  # fmt: skip
    groups = config.groups()
    assert sorted(len(g) for g in groups) == [2, 2, 4, 4]
    assert all(len({s.quantization.mode for s in g}) == 1 for g in groups)
    assert sorted(s.adapter_name for g in groups for s in g) == sorted(s.adapter_name for s in config.trials())


@pytest.mark.parametrize("slots", [[1, 1, 2, 2, 3, 3], [2, 0, 1, 2, 2, 3], [3, 3, 3, 3, 3, 3], [1, 2, 3, 1, 0, 2]])
@pytest.mark.parametrize("kernel", ["auto", "gather", "grouped"])
def test_differentiable_delta_matches_the_reference_with_gradients(slots: list[int], kernel: str) -> None:
    gen = torch.Generator().manual_seed(7)
    a = torch.randn(4, 5, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 9, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    x = torch.randn(len(slots), 12, generator=gen, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor(slots)
    mask = torch.ones(4, 1, 1, dtype=torch.float64)
    mask[0] = 0  # slot 0 = no adapter
    plan = LoraBatch(idx, kernel=kernel, cache_gathers=False)
    got = plan.delta(x, a * mask, b * mask)
    want = expand_reference(shrink_reference(x, a * mask, idx), b * mask, idx)
    torch.testing.assert_close(got, want)
    weights = torch.randn(got.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad((got * weights).sum(), [x, a, b])
    refs = torch.autograd.grad((want * weights).sum(), [x, a, b])
    for g, r in zip(grads, refs, strict=True):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("variant", ["gradient_checkpointing", "nf4"])
def test_cotrain_equals_solo_with_checkpointing_and_with_an_nf4_base(variant: str, tmp_path: Path) -> None:
    extra = {"gradient_checkpointing": True} if variant == "gradient_checkpointing" else {}
    specs = [_spec("sentiment", "x", {"r": 4, "alpha": 8}, max_steps=3, **extra),
             _spec("viggo", "y", {"r": 8, "alpha": 8}, max_steps=3, seed=2, **extra)]  # fmt: skip
    if variant == "nf4":
        specs = [s.model_copy(update={"quantization": s.quantization.model_copy(update={"mode": "nf4"})})
                 for s in specs]  # fmt: skip
    hooks = Recorder()
    cotrain(specs, hooks, tmp_path / "co", final_eval=False)
    for spec in specs:
        solo = Recorder(spec.adapter_name)
        train(spec, solo, tmp_path / spec.adapter_name, final_eval=False)
        assert hooks.losses(spec.adapter_name) == pytest.approx(solo.losses(spec.adapter_name), rel=LOSS_RTOL)
        want = load_file(str(tmp_path / spec.adapter_name / WEIGHTS_FILE))
        got = load_file(str(tmp_path / "co" / spec.adapter_name / WEIGHTS_FILE))
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=WEIGHT_ATOL, rtol=1e-3, msg=key)


def test_length_chunks_cut_padding_and_keep_every_row_once() -> None:
    from jobs.cotrain_loop import length_chunks
    from jobs.data import Encoded

    lengths = [300, 290, 280, 270, 260, 250, 240, 230] + [60, 55, 50, 45, 40, 35, 30, 25] + [120] * 8
    rows = [([Encoded([1] * n, [1] * n)], i % 3) for i, n in enumerate(lengths)]
    chunks = length_chunks(rows)
    assert 1 < len(chunks) <= 4 and all(len(c) >= 8 for c in chunks[:-1])
    assert sorted(id(item) for c in chunks for item in c) == sorted(id(item) for item in rows)

    def padded(groups) -> int:
        return sum(len(c) * max(len(r[0][0].input_ids) for r in c) for c in groups)

    assert padded(chunks) < 0.75 * padded([rows])
    assert length_chunks(rows[:8]) == [sorted(rows[:8], key=lambda r: -len(r[0][0].input_ids))]
