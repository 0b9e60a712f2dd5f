"""A user's own task, end to end on the tiny model, for every row format and every metric: data files in ->
`jobs.train_loop.train` -> an adapter with its prompt file -> the sweep's score -> the same eval rows sent to the
served adapter the way a client would (no system prompt, no instruction prefix) give the same tokens.

    pytest tests/test_user_tasks.py        # ~1-2 min on 2 cores (seven short trainings of the tiny model)
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest

from adapters.prompt_format import read_prompt_format
from adapters.sources.local_catalog import LocalCatalog
from jobs.config import SweepConfig
from jobs.metrics import score_split
from jobs.task_config import TaskConfig
from jobs.train_loop import PrintHooks, TrainOutcome, train
from serve_app.api import create_api
from serve_app.app_config import ServeAppConfig
from serve_app.engine import EngineConfig, LoraEngine
from serve_app.model_service import LocalBackend, ModelService

pytestmark = pytest.mark.slow
NAMES = ["ada", "bo", "cy", "di", "ed", "flo", "gus", "hal", "ivy", "jo", "kim", "lu"]
MAX_NEW = 5


def _rows(kind: str) -> list[dict[str, Any]]:
    """Twelve rows of a small synthetic task in the given raw format."""
    out = []
    for i, name in enumerate(NAMES):
        team = ("billing", "bug")[i % 2]
        if kind == "input_output":
            out.append({"input": f"hello {name}", "output": f"hi {name}"})
        elif kind == "numeric":
            out.append({"question": f"{i} plus 2?", "answer": str(i + 2)})
        elif kind == "prompt_completion":
            out.append({"prompt": f"Ticket from {name}: {team} issue\nTeam:", "completion": f" {team}"})
        elif kind == "regex":
            out.append({"prompt": f"Order {i} for {name}:", "completion": f" id={100 + i} ok"})
        elif kind == "messages":
            answer = json.dumps({"name": name, "n": i})
            out.append({"messages": [{"role": "system", "content": "Extract as JSON."},
                                     {"role": "user", "content": f"I am {name}"}, {"role": "assistant", "content": "ok"},
                                     {"role": "user", "content": f"number {i}"},
                                     {"role": "assistant", "content": answer}]})  # fmt: skip
        elif kind == "alpaca":
            out.append({"instruction": "Describe the person.", "input": name, "output": f"{name} is a person"})
        elif kind == "text":
            out.append({"text": f"The cat of {name} sat on the mat. The cat of {name} sat on the mat."})
    return out


def _write(folder: Path, kind: str, ext: str) -> str:
    """Write the rows as JSONL / CSV / Parquet (what users have)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{kind}.{ext}"
    rows = _rows(kind)
    if ext == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif ext == "csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path)
    return str(path)


# name -> (raw rows, file type, task config fields beyond train/eval_fraction, how a client asks: chat/completions/lorax)
CASES: dict[str, tuple[str, str, dict[str, Any], str]] = {
    "greet": ("input_output", "jsonl", {"instruction": "Greet back.", "metric": "exact_match"}, "chat"),
    "sums": (
        "numeric",
        "csv",
        {"columns": {"input": "question", "output": "answer"}, "metric": "numeric", "instruction": "Add."},
        "lorax",
    ),  # fmt: skip
    "triage": (
        "prompt_completion",
        "jsonl",
        {"instruction": "Route the ticket.", "metric": {"name": "choice", "labels": ["billing", "bug"]}},
        "completions",
    ),  # fmt: skip
    "orders": (
        "regex",
        "parquet",
        {"format": "prompt_completion", "metric": {"name": "regex", "pattern": r"id=(\d+)"}},
        "completions",
    ),  # fmt: skip
    "extract": ("messages", "jsonl", {"metric": "json_fields"}, "chat"),
    "describe": ("alpaca", "jsonl", {"metric": "rouge_l"}, "chat"),
    "corpus": ("text", "jsonl", {"metric": "eval_loss"}, "none"),
}


def _spec(tmp: Path, name: str) -> Any:
    kind, ext, fields, _ = CASES[name]
    task = {"train": _write(tmp / "data", kind, ext), "eval_fraction": 0.34, **fields}
    config = SweepConfig(name="u", base_model="tiny-llama", tasks={name: task}, lora={"r": 4, "alpha": 8, "dropout": 0},
                         training={"max_steps": 6, "micro_batch_size": 4, "learning_rate": 5e-3, "warmup_steps": 0,
                                   "log_every": 3, "checkpoint_every": 100, "max_seq_len": 128},
                         evaluation={"max_examples": 8, "max_new_tokens": MAX_NEW, "batch_size": 8})  # fmt: skip
    return config.trials()[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Any, TrainOutcome]]:
    tmp = tmp_path_factory.mktemp("user-tasks")
    out = {}
    for name in CASES:
        spec = _spec(tmp, name)
        out[name] = (spec, train(spec, PrintHooks(), tmp / "adapters" / name))
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_each_format_and_metric_trains_scores_and_keeps_its_prompt(trained: dict, name: str) -> None:
    spec, outcome = trained[name]
    kind, _, fields, _ = CASES[name]
    fmt = read_prompt_format(outcome.adapter_dir)
    assert fmt is not None and fmt.format == {"numeric": "input_output", "regex": "prompt_completion"}.get(kind, kind)
    assert outcome.steps == 6 and outcome.epochs == pytest.approx(6 * 4 / 8)  # 12 rows, a third held out
    if kind == "text":  # eval_loss: scored from the loss, lower is better; training on the corpus lowers it
        assert fmt.mode == "completion" and fmt.prompt_prefix is None
        assert math.isfinite(outcome.adapter_score) and outcome.adapter_score < outcome.base_score
        return
    assert fmt.mode == ("completion" if kind in ("prompt_completion", "regex") else "chat")
    if fmt.mode == "chat":  # the instruction, or the system turn every training conversation shares
        assert fmt.system_prompt == fields.get("instruction", "Extract as JSON." if kind == "messages" else None)
    else:
        assert fmt.prompt_prefix == (f"{fields['instruction']}\n\n" if "instruction" in fields else None)
    # the sweep's score is the metric over exactly the predictions it made
    metric = TaskConfig.model_validate({"train": "x", "eval_fraction": 0.1, **fields}).metric
    predictions = [e["adapter"] for e in outcome.examples]
    assert len(predictions) == 4
    assert outcome.adapter_score == pytest.approx(score_split(metric, predictions, [e["expected"] for e in
                                                                                   outcome.examples]).score)  # fmt: skip


def _client_request(kind: str, how: str, example: Any) -> tuple[str, dict[str, Any]]:
    """What a client sends for an eval row: only its own text (no system prompt, no instruction prefix)."""
    if how == "chat":
        messages = [m for m in example.prompt_messages() if m["role"] != "system"]
        return "/v1/chat/completions", {"messages": messages}
    if how == "lorax":
        return "/generate", {"inputs": example.prompt_messages()[-1]["content"]}
    raw = example.prompt.split("\n\n", 1)[1] if kind == "prompt_completion" else example.prompt
    return "/v1/completions", {"prompt": raw}


def test_the_served_adapter_answers_eval_rows_exactly_as_the_sweep_scored_them(trained: dict, tiny_base,
                                                                                 tmp_path: Path) -> None:  # fmt: skip
    from jobs.task_runtime import prepare_task

    catalog = LocalCatalog(tmp_path / "catalog")
    for name, (_, outcome) in trained.items():
        catalog.add(name, outcome.adapter_dir)
    config = ServeAppConfig(base_model="tiny-llama", catalog_dir=str(catalog.root), mlflow_tracking_uri="",
                            engine=EngineConfig(max_seq_len=256, max_loras=4))  # fmt: skip
    service = ModelService(config, engine=LoraEngine(tiny_base, config.engine))
    app = create_api(LocalBackend(service, max_adapters=8), service.registry, service.base_name, config)

    async def ask(path: str, body: dict[str, Any]) -> str:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            if path == "/generate":
                body = {"inputs": body["inputs"], "parameters": {"adapter_id": body["model"],
                                                                  "max_new_tokens": MAX_NEW}}  # fmt: skip
            else:
                body = {**body, "max_tokens": MAX_NEW, "temperature": 0}
            reply = await http.post(path, json=body)
            assert reply.status_code == 200, reply.text
            data = reply.json()
            if path == "/generate":
                return data["generated_text"]
            choice = data["choices"][0]
            return choice["message"]["content"] if "message" in choice else choice["text"]

    try:
        compared = 0
        for name, (spec, outcome) in trained.items():
            kind, _, _, how = CASES[name]
            if how == "none":
                continue
            eval_rows = prepare_task(spec, tiny_base.tokenizer).eval[:4]
            for example, scored in zip(eval_rows, outcome.examples, strict=True):
                path, body = _client_request(kind, how, example)
                served = asyncio.run(ask(path, {**body, "model": name}))
                assert served.strip() == scored["adapter"], (name, body)
                compared += 1
        assert compared == 24
    finally:
        service.engine.shutdown()
