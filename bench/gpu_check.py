"""One-command GPU self-check: does lorafleet train and serve correctly and fast on this CUDA machine?

    python -m bench.gpu_check --json gpu-check.json                 # a CUDA machine, 7B-shaped random model
    python -m bench.gpu_check --device cpu --tiny --json out.json   # CPU dry run of every section (the test suite)

Needs only torch, transformers, peft, triton and — brought along as wheels — pydantic (+ pydantic-core,
annotated-types, typing-inspection) and bitsandbytes, ~46 MB in all:

    pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \\
        bitsandbytes==0.50.2 pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
    pip install --no-deps *.whl && python -m bench.gpu_check --json gpu-check.json

No Ray, no MLflow (nothing it imports loads them). Sections (`--sections` picks some), each timed, each failure
recorded in the report instead of stopping the run:
  qlora      nf4 QLoRA of a 7B-shaped random model (Mistral-7B dimensions, random bf16 weights written once to
             `--model-dir`), r=16 on all projections, gradient checkpointing, 4 x 512 packed tokens, `--steps`
             steps through lorafleet's training loop: tokens/s, peak memory, loss decreasing; and the plain
             HF + PEFT + bitsandbytes recipe on the same base and batch shape in the same run (ratio)
  parity     bf16 autocast vs fp32 training of the tiny model from the same init on the same batches
  equality   the serving engine's greedy tokens vs PEFT's `generate`, per adapter, fp32 (must be equal) and bf16
             (share of identical requests, informational)
  serve      bench.serve_mixed at 7B shape: engine base-only vs mixed 1/8/32 adapters vs PEFT (ratios)
  cotrain    bench.cotrain: K=8 adapters co-trained over one nf4 base vs 8 concurrent solo runs
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import subprocess
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

SECTIONS = ("qlora", "parity", "equality", "serve", "cotrain")
# Mistral-7B-v0.1's dimensions (the random model is shaped like the A100 sweep's base).
SHAPE_7B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 4096, "rope_theta": 10000.0,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True, help="write the report here")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the tiny test model everywhere, small sizes (dry run)")
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--steps", type=int, default=30, help="QLoRA training steps")
    parser.add_argument("--model-dir", type=Path, default=None, help="where the 7B-shaped model is (re)used")
    args = parser.parse_args(argv)
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"--sections: unknown {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (use --device cpu --tiny for a dry run)")
    return args


def random_7b(folder: Path, device: str) -> Path:
    """A Llama-architecture model with Mistral-7B's shape and random bf16 weights, plus the tiny model's byte
    tokenizer, saved once in `folder` (~14.5 GB)."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    from adapters.tiny_llama import tiny_llama_dir

    if (folder / "config.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tiny = tiny_llama_dir()
    for item in tiny.iterdir():
        if item.name.startswith(("tokenizer", "special_tokens")) or item.name == "chat_template.jinja":
            shutil.copy(item, folder / item.name)
    config = LlamaConfig(**SHAPE_7B, bos_token_id=None, eos_token_id=2, pad_token_id=0, initializer_range=0.02)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return folder


def equality(device: str) -> dict[str, Any]:
    """Greedy tokens of the engine (requests over 4 adapters and the base, in one running batch) vs PEFT
    `generate` per adapter, on the tiny model."""
    from adapters.base_models import load_base
    from adapters.lora_files import BaseShapes
    from bench.runners import left_pad, peft_model
    from bench.workload import chat_prompts, round_robin, write_adapters
    from serve_app.engine import EngineConfig, LoraEngine, SamplingParams

    out: dict[str, Any] = {}
    dtypes = ["float32", "bfloat16"] if device.startswith("cuda") else ["float32"]
    for dtype in dtypes:
        base = load_base("tiny-llama", device=device, dtype=dtype)
        shapes = BaseShapes.from_config(base.model.config, base.fingerprint, base.name)
        with tempfile.TemporaryDirectory() as tmp:
            dirs = write_adapters(Path(tmp), shapes, 4, rank=8)
            reference = peft_model(base.model, dirs)
            prompts = chat_prompts(base.tokenizer, 10)
            names = round_robin(len(prompts), [*dirs, None])  # type: ignore[list-item]
            engine = LoraEngine(base, EngineConfig(device=device, dtype=dtype, max_running=len(prompts),
                                                   max_seq_len=max(map(len, prompts)) + 17, max_loras=4,
                                                   max_lora_rank=8))  # fmt: skip
            for name, folder in dirs.items():
                engine.register_adapter(name, folder)
            got: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
            for i, (ids, name) in enumerate(zip(prompts, names, strict=True)):
                engine.add_request(str(i), ids, SamplingParams(max_tokens=16, ignore_eos=True), name)
            while engine.has_work():
                for token in engine.step():
                    if token.token_id is not None:
                        got[token.request_id].append(token.token_id)
            same = 0
            for i, (ids, name) in enumerate(zip(prompts, names, strict=True)):
                batch, mask = (t.to(device) for t in left_pad([ids], base.tokenizer.pad_token_id))
                context = reference.disable_adapter() if name is None else _active(reference, name)
                with torch.inference_mode(), context:
                    full = reference.generate(input_ids=batch, attention_mask=mask, max_new_tokens=16,
                                              min_new_tokens=16, do_sample=False,
                                              pad_token_id=base.tokenizer.pad_token_id)  # fmt: skip
                same += full[0, batch.shape[1] :].tolist() == got[str(i)]
        out[dtype] = {"requests": len(prompts), "identical": same, "all_equal": same == len(prompts)}
    out["ok"] = out["float32"]["all_equal"]
    return out


def _active(model: Any, name: str) -> Any:
    import contextlib

    model.set_adapter(name)
    return contextlib.nullcontext()


def serve(model: str, device: str, tiny: bool) -> dict[str, Any]:
    from bench import serve_mixed

    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "serve.json"
        sizes = ["--requests", "8", "--max-new-tokens", "4", "--adapters", "1,4"] if tiny else \
            ["--requests", "32", "--max-new-tokens", "32", "--adapters", "1,8,32"]  # fmt: skip
        code = serve_mixed.main(["--base", model, "--device", device, *sizes, "--repeats", "1", "--json", str(report)])
        data = json.loads(report.read_text())
    return {"exit": code, "rows": data["rows"], "targets": data["targets"], "meta": data["meta"]}


def cotrain(model: str, device: str, tiny: bool) -> dict[str, Any]:
    """bench.cotrain in its own process (it starts worker processes itself)."""
    import sys

    on_cuda = device.startswith("cuda")
    sizes = ["--k", "2", "--steps", "1", "--micro-batch", "1", "--seq-len", "384", "--quant", "none"] if tiny else \
        ["--k", "8", "--steps", "6", "--micro-batch", "4", "--seq-len", "512", "--quant", "nf4", "--grad-ckpt"]  # fmt: skip
    if on_cuda:
        sizes += ["--optimizer", "paged_adamw_32bit"]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "cotrain.json"
        command = [sys.executable, "-m", "bench.cotrain", "--base", model, "--device", device, *sizes,
                   "--skip", "cotrain_bcopy,sequential", "--json", str(report)]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if not report.is_file():
            raise RuntimeError(f"bench.cotrain exited {done.returncode}: {done.stderr[-2000:]}")
        data = json.loads(report.read_text())
    return {"exit": done.returncode, **data}


def run_section(name: str, work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    started = time.monotonic()
    print(f"[gpu_check] {name} ...", flush=True)
    try:
        result = {"status": "ok", **work()}
    except Exception as err:  # a broken section is reported, the others still run
        result = {"status": "error", "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
    result["seconds"] = round(time.monotonic() - started, 1)
    print(f"[gpu_check] {name}: {result['status']} in {result['seconds']} s", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    from bench import gpu_check_train as training

    args = parse_args(argv)
    wanted = args.sections.split(",")
    started = time.monotonic()
    device = args.device
    report: dict[str, Any] = {"meta": {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "device": device,
        "gpu": torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__, "tiny": args.tiny, "commit": _commit()}}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="lorafleet-gpu-check-") as tmp:
        if args.tiny:
            from adapters.tiny_llama import tiny_llama_dir

            model, steps, micro, seq = str(tiny_llama_dir()), min(args.steps, 6), 2, 384  # byte tokens: rows ~300
        else:
            model_dir = args.model_dir or Path(tmp) / "random-7b"
            report["model"] = run_section("model", lambda: {"path": str(random_7b(model_dir, device))})
            model, steps, micro, seq = str(model_dir), args.steps, 4, 512
        sections = {
            "qlora": lambda: {"lorafleet": training.qlora_lorafleet(model, device, steps, micro, seq),
                              "hf_peft_bnb": training.qlora_hf_reference(model, device, steps, micro, seq)},
            "parity": lambda: training.precision_parity(device, 6 if args.tiny else 40),
            "equality": lambda: equality(device),
            "serve": lambda: serve(model, device, args.tiny),
            "cotrain": lambda: cotrain(model, device, args.tiny),
        }  # fmt: skip
        for name in wanted:
            report[name] = run_section(name, sections[name])
    if "qlora" in report and report["qlora"]["status"] == "ok":
        ours, ref = report["qlora"]["lorafleet"], report["qlora"]["hf_peft_bnb"]
        report["qlora"]["tokens_per_s_ratio"] = ours["tokens_per_s"] / ref["tokens_per_s"]
    report["meta"]["seconds"] = round(time.monotonic() - started, 1)
    args.json.write_text(json.dumps(report, indent=2, default=str))
    failed = [n for n in wanted if report[n]["status"] != "ok"]
    print(f"[gpu_check] wrote {args.json} in {report['meta']['seconds']} s; failed sections: {failed or 'none'}")
    return 1 if failed else 0


def _commit() -> str:
    done = subprocess.run(
        ["git", "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True, text=True, check=False
    )
    return done.stdout.strip() or "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
