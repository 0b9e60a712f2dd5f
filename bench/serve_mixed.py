"""Serving benchmark: one base model, many LoRA adapters, one mixed batch.

Same process, same engine, same prompts, same number of new tokens in every case; generated tokens/s for
  - engine, base only                    (no adapter: the engine's normal base path)
  - engine, base only, no side thread    (CPU, when the engine runs LoRA on a side thread, which takes one of
                                          PyTorch's threads: the base with every thread; the ratios use the
                                          faster of the two base-only cases)
  - engine, N mixed adapters             (requests round-robin over N adapters, all in flight together)
  - PEFT mixed batch                     (`model.generate(..., adapter_names=[...])`, left-padded, largest N)
  - PEFT swap per adapter                (group requests by adapter; `set_adapter` + `generate` per group)
  - HF generate, base only               (reference point; `--no-hf-base` skips it)
Decoding is greedy with a fixed length (EOS ignored), so every case generates requests x max_new_tokens tokens;
time includes prefill. Adapters are random rank-`--rank` PEFT adapters on all seven projections, written to a
temp dir. After one short warm-up pass of every case, the cases run interleaved `--repeats` times (the order
rotates each repeat, so slow phases of a shared machine hit every case); the table shows medians of wall-clock
tokens/s, and the last column the ratio by process CPU time, which other processes on a shared machine inflate
far less (use it with `--threads 1`: with more threads, spin-waiting counts as CPU time, the side thread's
included). PEFT and HF cases always run with every thread the run started with.

    python -m bench.serve_mixed                                  # tiny-llama on CPU, 64 requests, N = 1, 8, 32
    python -m bench.serve_mixed --threads 1 --repeats 9 --json bench-cpu.json
    python -m bench.serve_mixed --base smollm2-135m --requests 32 --max-new-tokens 16 --repeats 3
    python -m bench.serve_mixed --base <hf id or path> --device cuda --requests 64 --max-new-tokens 64 \\
        --json bench-gpu.json

Targets (issue "Serving"): engine mixed-32 >= 0.8x engine base-only and >= 5x PEFT mixed batch (`--strict`
exits 1 if either is missed). On CPU only the ratios mean anything; absolute tokens/s are indicative.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from adapters.base_models import load_base
from adapters.lora_files import BaseShapes
from bench.runners import EngineRunner, PeftRunner, Sample, peft_model
from bench.workload import Workload, adapter_names, chat_prompts, round_robin, write_adapters
from serve_app.engine import EngineConfig, LoraEngine

BASE_KEY = "engine-base"
PLAIN_BASE_KEY = "engine-base-all-threads"
TARGET_VS_BASE = 0.8
TARGET_VS_PEFT = 5.0


@dataclass
class Case:
    key: str
    label: str
    work: Workload
    run: Callable[[Workload], Sample]


@dataclass
class Row:
    key: str
    label: str
    adapters: int
    most_mixed: int
    tokens_per_s: float  # median over repeats
    spread: tuple[float, float]  # min, max tokens/s
    vs_base: float | None
    vs_peft_mixed: float | None
    vs_base_cpu: float | None  # the same ratio by median CPU-time throughput
    samples: list[float]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="tiny-llama", help="tiny-llama, smollm2-135m, a folder or an HF id")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--adapters", default="1,8,32", help="comma-separated N of distinct adapters")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefill-chunk", type=int, default=256, help="engine prompt tokens per step")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--kernel", default="auto", choices=["auto", "native", "gather", "grouped"],
                        help="the engine's mixed-adapter LoRA path (adapters/batched_lora.py)")  # fmt: skip
    parser.add_argument("--no-hf-base", action="store_true", help="skip the plain HF generate reference case")
    parser.add_argument("--json", type=Path, help="also write every sample and the summary here")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args(argv)
    args.adapter_counts = sorted({int(n) for n in args.adapters.split(",") if n.strip()})
    if not args.adapter_counts or min(args.adapter_counts) < 1:
        parser.error("--adapters needs positive counts, e.g. 1,8,32")
    if args.requests < 1 or args.max_new_tokens < 1 or args.repeats < 1:
        parser.error("--requests, --max-new-tokens and --repeats must be >= 1")
    return args


def build_cases(args: argparse.Namespace, adapter_root: Path) -> tuple[list[Case], dict[str, str]]:
    """Load the base, write the adapters, build engine + PEFT model, and return the cases and run metadata."""
    base = load_base(args.base, device=args.device if args.device != "auto" else _auto_device(), dtype=args.dtype)
    model = base.model
    device = next(model.parameters()).device
    shapes = BaseShapes.from_config(model.config, base.fingerprint, base.name)
    largest = max(args.adapter_counts)
    dirs = write_adapters(adapter_root, shapes, largest, args.rank)
    prompts = chat_prompts(base.tokenizer, args.requests)
    config = EngineConfig(
        device=str(device),
        dtype=args.dtype,
        max_running=args.requests,
        max_seq_len=max(len(p) for p in prompts) + args.max_new_tokens + 1,
        max_queue=args.requests + 1,
        max_loras=largest,
        max_lora_rank=args.rank,
        prefill_chunk=args.prefill_chunk,
        lora_kernel=args.kernel,
    )
    threads = torch.get_num_threads()
    engine = LoraEngine(base, config)
    for name, folder in dirs.items():
        engine.register_adapter(name, folder)
    runner = EngineRunner(engine)
    peft = PeftRunner(peft_model(model, dirs), base.tokenizer.pad_token_id)
    everything = _on_threads(threads)  # the references get every thread the run started with

    base_work = Workload("base", prompts, round_robin(args.requests, []), args.max_new_tokens)
    names = adapter_names(largest)
    cases = [Case(BASE_KEY, "engine, base only", base_work, runner.run)]
    side = engine.runner.side is not None
    if side:  # the engine gave a PyTorch thread to its LoRA side thread: also time the base without that trade
        plain = EngineRunner(LoraEngine(base, config.model_copy(update={"lora_overlap": "off"})))
        label = f"engine, base only, no side thread ({threads} PyTorch threads)"
        cases.append(Case(PLAIN_BASE_KEY, label, base_work, everything(plain.run)))
    for n in args.adapter_counts:
        work = base_work.with_adapters(f"mixed-{n}", round_robin(args.requests, names[:n]))
        cases.append(Case(f"engine-mixed-{n}", f"engine, {work.distinct_adapters} mixed adapters", work, runner.run))
    widest = base_work.with_adapters(f"mixed-{largest}", round_robin(args.requests, names))
    n = widest.distinct_adapters
    cases.append(Case("peft-mixed", f"PEFT adapter_names batch, {n} adapters", widest, everything(peft.mixed)))
    cases.append(Case("peft-swap", f"PEFT set_adapter per group, {n} adapters", widest, everything(peft.swap)))
    if not args.no_hf_base:
        cases.append(Case("hf-base", "HF generate, base only", base_work, everything(peft.base)))
    meta = {
        "base": base.name,
        "device": _device_name(device),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "threads": str(threads),
        "lora_side_thread": f"on (PyTorch {engine.overlap.torch_threads or threads} + 1 LoRA thread)"
        if side
        else "off",
        "kernel": args.kernel,
        "date": dt.date.today().isoformat(),
        "prompt_tokens": f"{min(len(p) for p in prompts)}-{max(len(p) for p in prompts)}",
    }
    return cases, meta


def _on_threads(threads: int) -> Callable[[Callable[[Workload], Sample]], Callable[[Workload], Sample]]:
    """Wrap a case's run so it runs with `threads` PyTorch threads (then restores the engine's count)."""

    def wrap(run: Callable[[Workload], Sample]) -> Callable[[Workload], Sample]:
        def on_threads(work: Workload) -> Sample:
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                return run(work)
            finally:
                torch.set_num_threads(before)

        return on_threads

    return wrap


def _auto_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def measure(cases: list[Case], repeats: int, log: Callable[[str], None]) -> dict[str, list[Sample]]:
    """One short warm-up pass of every case, then `repeats` interleaved timed passes, the order rotated each
    time (noise hits all cases alike)."""
    for case in cases:
        case.run(case.work.shortened(min(4, case.work.max_new_tokens)))
    samples: dict[str, list[Sample]] = {case.key: [] for case in cases}
    for repeat in range(repeats):
        shift = repeat % len(cases)
        for case in cases[shift:] + cases[:shift]:
            sample = case.run(case.work)
            samples[case.key].append(sample)
            log(f"repeat {repeat + 1}/{repeats}  {case.label:46s} {sample.tokens_per_s:10.1f} tok/s "
                f"({sample.tokens_per_cpu_s:.1f} per CPU s)")  # fmt: skip
    return samples


def summarize(cases: list[Case], samples: dict[str, list[Sample]]) -> list[Row]:
    medians = {key: statistics.median(s.tokens_per_s for s in runs) for key, runs in samples.items()}
    cpu = {key: statistics.median(s.tokens_per_cpu_s for s in runs) for key, runs in samples.items()}
    # the engine's base-only speed: the faster of with and without the LoRA side thread's PyTorch thread
    base = max((medians[k] for k in (BASE_KEY, PLAIN_BASE_KEY) if k in medians), default=None)
    base_cpu = max((cpu[k] for k in (BASE_KEY, PLAIN_BASE_KEY) if k in cpu), default=None)
    peft = medians.get("peft-mixed")
    rows = []
    for case in cases:
        rates = [s.tokens_per_s for s in samples[case.key]]
        rate = medians[case.key]
        rows.append(Row(case.key, case.label, case.work.distinct_adapters, max(s.most_mixed for s in samples[case.key]),
                        rate, (min(rates), max(rates)), rate / base if base else None,
                        rate / peft if peft else None, cpu[case.key] / base_cpu if base_cpu else None,
                        rates))  # fmt: skip
    return rows


def targets(rows: list[Row]) -> list[tuple[str, float, float, bool]]:
    """(description, measured, target, met) for the widest engine mixed case."""
    mixed = [r for r in rows if r.key.startswith("engine-mixed-")]
    if not mixed:
        return []
    widest = max(mixed, key=lambda r: r.adapters)
    out = []
    if widest.vs_base is not None:
        out.append((f"{widest.key} / engine-base", widest.vs_base, TARGET_VS_BASE, widest.vs_base >= TARGET_VS_BASE))
    if widest.vs_peft_mixed is not None:
        ok = widest.vs_peft_mixed >= TARGET_VS_PEFT
        out.append((f"{widest.key} / peft-mixed", widest.vs_peft_mixed, TARGET_VS_PEFT, ok))
    return out


def print_table(rows: list[Row], meta: dict[str, str], args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    title = (f"{meta['base']} on {meta['device']}, {meta['dtype']}, {args.requests} requests x "
             f"{args.max_new_tokens} new tokens, r={args.rank}, median of {args.repeats}")  # fmt: skip
    table = Table(title=title)
    columns = ("case", "adapters", "max mixed/step", "tokens/s", "min-max", "x engine base", "x PEFT mixed",
               "x engine base (CPU time)")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column == "case" else "right")
    for r in rows:
        table.add_row(r.label, str(r.adapters), str(r.most_mixed), f"{r.tokens_per_s:,.1f}",
                      f"{r.spread[0]:,.0f}-{r.spread[1]:,.0f}", _ratio(r.vs_base), _ratio(r.vs_peft_mixed),
                      _ratio(r.vs_base_cpu))  # fmt: skip
    console = Console(width=max(Console().width, 150))
    console.print(table)
    for name, value, goal, met in targets(rows):
        console.print(
            f"{'[green]met[/green]' if met else '[red]MISSED[/red]'}  {name} = {value:.2f}x (target >= {goal}x)"
        )
    one = next((r for r in rows if r.key == "engine-mixed-1"), None)
    if one is not None and one.vs_base is not None:
        console.print(
            f"for scale: one adapter on every row (LoRA cost, no mixing cost) = {one.vs_base:.2f}x engine base"
        )
    console.print(f"load average before/after: {meta['load_before']} / {meta['load_after']}")
    if meta["device"].startswith("CPU"):
        console.print("CPU run: compare ratios only; absolute tokens/s are indicative.")


def _load() -> str:
    """The 1/5/15-minute load averages (how busy a shared machine was)."""
    return " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="lorafleet-bench-") as tmp:
        cases, meta = build_cases(args, Path(tmp))
        gc.collect()
        gc.freeze()  # as a serving replica does after start-up: the models are not garbage, skip them in GC passes
        meta["load_before"] = _load()
        samples = measure(cases, args.repeats, print)
        meta["load_after"] = _load()
    rows = summarize(cases, samples)
    print_table(rows, meta, args)
    checks = targets(rows)
    if args.json:
        report = {
            "meta": meta,
            "args": {k: v for k, v in vars(args).items() if k != "json"},
            "rows": [asdict(r) for r in rows],
            "samples": {k: [asdict(s) for s in v] for k, v in samples.items()},
            "targets": [{"ratio": n, "value": v, "target": g, "met": m} for n, v, g, m in checks],
        }
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 1 if args.strict and not all(met for *_, met in checks) else 0


if __name__ == "__main__":
    raise SystemExit(main())
