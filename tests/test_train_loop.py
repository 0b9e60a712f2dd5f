"""The training loop without Ray, on the tiny model: completion-only labels, exact packing, resume from a
checkpoint equal to an uninterrupted run, a loss that goes down, and the DeepSpeed option wired through."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adapters.lora_files import META_BASE_FINGERPRINT, WEIGHTS_FILE, read_lora
from jobs.config import DeepSpeedSettings, SweepConfig
from jobs.data import IGNORE, Encoded, collate, encode_examples, pack
from jobs.task_data import load_task
from jobs.tasks import bundled_task_config
from jobs.train_loop import PrintHooks, loss_sum, train


def _spec(**training):
    config = SweepConfig(name="t", base_model="tiny-llama", tasks=["sentiment"],
                         lora={"r": 4, "alpha": 8, "dropout": 0.0},
                         training={"max_steps": 6, "micro_batch_size": 4, "learning_rate": 1e-3, "warmup_steps": 1,
                                   "log_every": 1, "checkpoint_every": 3, **training},
                         evaluation={"max_examples": 4, "max_new_tokens": 4, "batch_size": 8})  # fmt: skip
    return config.trials()[0]


def _encoded(tokenizer, task: str, n: int) -> list[Encoded]:
    """The first n training rows of a bundled task, encoded as the training loops encode them."""
    examples = load_task(task, bundled_task_config(task)).train[:n]
    return encode_examples(tokenizer, examples, 1024, "truncate")[0]


def test_labels_cover_only_the_completion(tiny_base) -> None:
    row = load_task("order_extraction", bundled_task_config("order_extraction")).train[0]
    (encoded,) = _encoded(tiny_base.tokenizer, "order_extraction", 1)
    trained = [t for t, lab in zip(encoded.input_ids, encoded.labels, strict=True) if lab != IGNORE]
    assert tiny_base.tokenizer.decode(trained) == row.reference + "<|im_end|>\n"
    first = encoded.labels.index(next(lab for lab in encoded.labels if lab != IGNORE))
    assert tiny_base.tokenizer.decode(encoded.input_ids[:first]).endswith("<|im_start|>assistant\n")


def test_packed_rows_give_the_same_loss_as_unpacked(tiny_base) -> None:
    examples = _encoded(tiny_base.tokenizer, "sentiment", 6)
    packed = pack(examples, 1024)
    assert len(packed) < len(examples)

    def mean_loss(rows) -> float:
        batch = collate(rows, tiny_base.tokenizer.pad_token_id)
        labels = batch.pop("labels")[:, 1:]
        with torch.no_grad():
            logits = tiny_base.model(**batch).logits[:, :-1]
        return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                       ignore_index=IGNORE))  # fmt: skip

    assert mean_loss(packed) == pytest.approx(mean_loss([[e] for e in examples]), rel=1e-5)


def test_loss_on_completion_positions_equals_the_full_logits_loss(tiny_base) -> None:
    examples = _encoded(tiny_base.tokenizer, "viggo", 5)
    batch = collate([[e] for e in examples], tiny_base.tokenizer.pad_token_id)
    assert {len(e.input_ids) for e in examples} != {batch["input_ids"].shape[1]}  # rows really are padded
    with torch.no_grad():
        summed, count = loss_sum(tiny_base.model, batch)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = tiny_base.model(**inputs).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        full = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=IGNORE, reduction="sum")  # fmt: skip
    assert count == sum(sum(lab != IGNORE for lab in e.labels) for e in examples)
    assert float(summed) == pytest.approx(float(full), rel=1e-5)


def test_left_padding_does_not_change_a_rows_logits(tiny_base) -> None:
    short, long = sorted(_encoded(tiny_base.tokenizer, "sentiment", 8), key=lambda e: len(e.input_ids))[::7]
    batch = collate([[short], [long]], tiny_base.tokenizer.pad_token_id)
    with torch.no_grad():
        padded = tiny_base.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 position_ids=batch["position_ids"]).logits[0, -len(short.input_ids):]  # fmt: skip
        alone = tiny_base.model(input_ids=torch.tensor([short.input_ids])).logits[0]
    assert torch.allclose(padded, alone, atol=1e-4)  # logits reach ~10 in the random tiny model


def test_resumed_run_equals_uninterrupted_run(tmp_path: Path) -> None:
    spec = _spec()
    straight = train(spec, PrintHooks(), tmp_path / "straight")

    class StopAtFirstCheckpoint(PrintHooks):
        def checkpoint(self, step, folder, metrics):
            import shutil

            shutil.copytree(folder, tmp_path / "ckpt")
            raise KeyboardInterrupt  # a crash right after the checkpoint

    with pytest.raises(KeyboardInterrupt):
        train(spec, StopAtFirstCheckpoint(), tmp_path / "crashed")
    resumed = train(spec, PrintHooks(), tmp_path / "resumed", resume=tmp_path / "ckpt")
    assert resumed.steps == straight.steps == 6
    a, b = load_file(str(tmp_path / "straight" / WEIGHTS_FILE)), load_file(str(tmp_path / "resumed" / WEIGHTS_FILE))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    start = load_file(str(tmp_path / "ckpt" / WEIGHTS_FILE))
    assert any(not torch.allclose(start[k], a[k]) for k in a)  # training after the checkpoint changed weights


def test_loss_goes_down_and_the_adapter_is_servable(tmp_path: Path, tiny_shapes) -> None:
    losses: list[float] = []

    class Record(PrintHooks):
        def log(self, step, metrics):
            if "loss" in metrics:
                losses.append(metrics["loss"])

    outcome = train(_spec(max_steps=30, micro_batch_size=8, learning_rate=3e-3, log_every=5), Record(), tmp_path / "a")
    assert losses[-1] < losses[0] * 0.8
    header = load_file(str(tmp_path / "a" / WEIGHTS_FILE))
    assert header  # safetensors, readable
    weights = read_lora(tmp_path / "a", tiny_shapes, max_rank=4)  # the engine's validation accepts it
    assert weights.rank == 4 and len(weights.modules) == 2 * 7
    from safetensors import safe_open

    with safe_open(str(tmp_path / "a" / WEIGHTS_FILE), "pt") as handle:
        assert handle.metadata()[META_BASE_FINGERPRINT] == tiny_shapes.fingerprint
    assert 0 <= outcome.base_score <= 100 and 0 <= outcome.adapter_score <= 100


def test_qlora_nf4_trains_on_cpu_and_the_engine_scores_it(tmp_path: Path) -> None:
    """adapters/QUANTIZATION.md's claim: 4-bit NF4 (double quant) + LoRA trains on CPU with the pinned versions, and
    the final evaluation (the serving engine over the NF4 base, base and adapter rows in one batch) runs."""
    losses: list[float] = []

    class Record(PrintHooks):
        def log(self, step, metrics):
            if "loss" in metrics:
                losses.append(metrics["loss"])

    spec = _spec(max_steps=12, micro_batch_size=4, learning_rate=3e-3, log_every=3)
    spec = spec.model_copy(update={"quantization": spec.quantization.model_copy(update={"mode": "nf4"})})
    outcome = train(spec, Record(), tmp_path / "q")
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert (tmp_path / "q" / WEIGHTS_FILE).exists()
    assert 0 <= outcome.adapter_score <= 100


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="the [deepspeed] extra is not installed")
def test_deepspeed_option_is_wired_through(tmp_path: Path, monkeypatch) -> None:
    """ZeRO-2 on CPU/gloo: the trainer really runs through a DeepSpeed engine (first run JIT-builds an op)."""
    import torch.distributed as dist
    from conftest import free_port

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        import deepspeed

        engines = []
        original = deepspeed.initialize

        def spy(*args, **kwargs):
            result = original(*args, **kwargs)
            engines.append((kwargs["config"], result[0]))
            return result

        monkeypatch.setattr(deepspeed, "initialize", spy)
        outcome = train(_spec(max_steps=2, grad_accum=2).model_copy(update={"deepspeed": DeepSpeedSettings(stage=2)}), PrintHooks(),
                        tmp_path / "ds")  # fmt: skip
    finally:
        dist.destroy_process_group()
    assert len(engines) == 1
    config, engine = engines[0]
    assert config["zero_optimization"]["stage"] == 2 and config["gradient_accumulation_steps"] == 2
    assert engine.global_steps == 2 and outcome.steps == 2
    assert os.path.exists(tmp_path / "ds" / WEIGHTS_FILE)
