"""Co-training benchmark: K adapters co-trained over one base copy vs K solo runs one after another vs K solo runs
at the same time on the same device, at the same per-adapter micro-batch and step count.

Mode `cotrain_bcopy` co-trains as the bank did before it scaled each row's delta: the forward multiplied every
adapter's B by its scale in every wrapped module and autograd kept those copies for backward. It is kept here only as
the baseline of that change (`--skip cotrain_bcopy` leaves it out); "held MB" is the peak of tensor memory autograd
holds for backward (distinct storages, measured with saved-tensor hooks), which on CPU shows the change more
precisely than the process's peak RSS.

For each K it reports aggregate training tokens/s (all adapters' non-padding tokens / wall time of the training
loops), wall time per adapter, and peak memory (CUDA: max allocated; CPU: peak RSS), summed over processes for
the concurrent case; then the ratios the issue sets targets for. Every case runs in fresh subprocesses
(`--worker`), so each peak is its own. Solo runs are `jobs.train_loop.train` (PEFT), co-training is
`jobs.cotrain_loop.cotrain` (the batched-LoRA operator); both without the final evaluation. Adapters cycle through
the bundled tasks with three learning rates, so rows of different tasks and hyperparameters share each forward.
Concurrent solo processes split the CPU threads (at least one each); on a GPU they share the card.

    python -m bench.cotrain                              # tiny-llama on CPU, K = 1, 4, 8, 16, 8 steps
    python -m bench.cotrain --k 1,4 --steps 4 --base smollm2-135m --seq-len 256
    python -m bench.cotrain --base smollm2-135m --k 8 --steps 2 --micro-batch 1 --seq-len 64 \\
        --skip sequential,concurrent          # the scaled-B-copy baseline vs the bank's delta scaling
    python -m bench.cotrain --device cuda --base <7B HF id or path> --quant nf4 --micro-batch 4 --seq-len 512 \\
        --grad-ckpt --optimizer paged_adamw_32bit --k 1,4,8,16 --steps 10 --json bench-cotrain-gpu.json

Targets (issue "Co-training"): on GPU, 7B-shaped nf4 base: K=8 co-trained >= 1.3x the aggregate tokens/s of 8
concurrent solo runs and <= 0.4x their summed peak memory; K=16 co-trained runs where 16 solo runs do not fit.
On CPU with the tiny model: co-training beats concurrent solo runs. `--strict` exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULT = "BENCH_RESULT "
TASK_CYCLE = ["sentiment", "order_extraction", "word_math", "text_to_sql", "viggo", "date_normalisation"]
LEARNING_RATES = [1e-3, 5e-4, 2e-3]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="tiny-llama")
    p.add_argument("--quant", default="none", choices=["none", "nf4"])
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--k", default="1,4,8,16", help="comma-separated adapter counts")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--grad-ckpt", action="store_true")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "paged_adamw_32bit", "paged_adamw_8bit"])
    p.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="CPU threads per case (split when concurrent)"
    )
    p.add_argument("--skip", default="", help="comma-separated modes to skip: cotrain_bcopy,sequential,concurrent")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--strict", action="store_true")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def trial_specs(args: argparse.Namespace, k: int) -> list[Any]:
    from jobs.config import SweepConfig

    specs = []
    for i in range(k):
        task = TASK_CYCLE[i % len(TASK_CYCLE)]
        config = SweepConfig(name="bench", base_model=args.base, tasks=[task], quantization={"mode": args.quant},
                             lora={"r": args.rank, "alpha": 2 * args.rank, "dropout": 0.05},
                             training={"max_steps": args.steps, "micro_batch_size": args.micro_batch,
                                       "max_seq_len": args.seq_len, "learning_rate": LEARNING_RATES[i % 3],
                                       "warmup_steps": 1, "log_every": args.steps, "checkpoint_every": 10**6,
                                       "gradient_checkpointing": args.grad_ckpt, "optimizer": args.optimizer,
                                       "seed": i})  # fmt: skip
        specs.append(config.trials()[0].model_copy(update={"adapter_name": f"a{i:02d}-{task}"}))
    return specs


# -- worker side: one process, one case ------------------------------------------------------------------------
class _Quiet:
    def log(self, *args: Any) -> None: ...
    def checkpoint(self, *args: Any) -> None: ...


class _HeldMeter:
    """Peak bytes of the distinct tensor storages autograd holds for backward (saved-tensor hooks)."""

    def __init__(self) -> None:
        self.live: dict[int, list[int]] = {}  # storage address -> [references, bytes]
        self.held = self.peak = 0

    def pack(self, t: Any) -> Any:
        storage = t.untyped_storage()
        entry = self.live.setdefault(storage.data_ptr(), [0, storage.nbytes()])
        if entry[0] == 0:
            self.held += entry[1]
            self.peak = max(self.peak, self.held)
        entry[0] += 1
        return _Held(t, self, storage.data_ptr())


class _Held:
    def __init__(self, tensor: Any, meter: _HeldMeter, address: int) -> None:
        self.tensor, self.meter, self.address = tensor, meter, address

    def __del__(self) -> None:
        entry = self.meter.live[self.address]
        entry[0] -= 1
        if entry[0] == 0:
            self.meter.held -= entry[1]
            del self.meter.live[self.address]


def _scaled_b_copy(bank: Any, module_name: str, x: Any) -> Any:
    """The delta as co-training computed it before: B times each slot's scale (a copy, kept for backward)."""
    a, b = bank.weights(module_name)
    return bank.plan.delta(x, a, b * bank.scales.view(-1, 1, 1))


def run_worker(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    from jobs.config import TrialSpec

    torch.set_num_threads(job["threads"])
    specs = [TrialSpec.model_validate(s) for s in job["specs"]]
    device = job["device"]
    out = Path(tempfile.mkdtemp(prefix="bench-cotrain-"))
    meter = _HeldMeter()
    started = time.time()
    try:
        if job["mode"] in ("cotrain", "cotrain_bcopy"):
            from adapters.trainable_lora import TrainableLoraBank
            from jobs.cotrain_loop import cotrain

            if job["mode"] == "cotrain_bcopy":
                TrainableLoraBank.delta = _scaled_b_copy  # type: ignore[method-assign]
            with torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda held: held.tensor):
                outcomes = list(cotrain(specs, _Quiet(), out, device=device, final_eval=False).values())
            seconds = max(o.train_seconds for o in outcomes)
        else:
            from jobs.train_loop import train

            with torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda held: held.tensor):
                outcomes = [train(s, _Quiet(), out / s.adapter_name, device=device, final_eval=False) for s in specs]
            seconds = sum(o.train_seconds for o in outcomes)
    except torch.cuda.OutOfMemoryError as err:
        return {"oom": True, "error": str(err).splitlines()[0]}
    tokens = sum(round(o.tokens_per_s * o.train_seconds) for o in outcomes)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else outcomes[-1].peak_memory_mb
    return {"oom": False, "tokens": tokens, "train_seconds": seconds, "peak_mb": peak, "started": started,
            "ended": time.time(), "steps": [o.steps for o in outcomes], "held_mb": meter.peak / 2**20}  # fmt: skip


def _spawn(job: dict[str, Any]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(job["threads"]), "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", "bench.cotrain", "--worker", json.dumps(job)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip


def _collect(proc: subprocess.Popen) -> dict[str, Any]:
    stdout, stderr = proc.communicate()
    for line in stdout.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT) :])
    if "out of memory" in stderr.lower():  # e.g. killed while loading, before the worker could report it
        return {"oom": True, "error": stderr.strip().splitlines()[-1]}
    raise RuntimeError(f"benchmark worker failed (exit {proc.returncode}): {stderr.strip()[-2000:]}")


# -- driver side -----------------------------------------------------------------------------------------------
def run_case(args: argparse.Namespace, mode: str, specs: list[Any]) -> dict[str, Any]:
    """mode: cotrain (one process, K adapters), cotrain_bcopy (the same, scaling copies of B: the old baseline),
    sequential (one process, K solo runs), concurrent (K processes)."""
    dumped = [s.model_dump(mode="json") for s in specs]
    if mode != "concurrent":
        job = {"mode": mode if mode.startswith("cotrain") else "solo", "specs": dumped, "device": args.device,
               "threads": args.threads}  # fmt: skip
        result = _collect(_spawn(job))
        if result["oom"]:
            return {"mode": mode, "k": len(specs), "oom": True}
        wall = result["train_seconds"]
        return {"mode": mode, "k": len(specs), "oom": False, "tokens": result["tokens"], "wall_s": wall,
                "tokens_per_s": result["tokens"] / wall, "peak_mb": result["peak_mb"],
                "held_mb": result["held_mb"]}  # fmt: skip
    threads = max(1, args.threads // len(specs))
    procs = [_spawn({"mode": "solo", "specs": [s], "device": args.device, "threads": threads}) for s in dumped]
    results = [_collect(p) for p in procs]
    if any(r["oom"] for r in results):
        return {"mode": mode, "k": len(specs), "oom": True}
    # every process's loop: from the first loop's start to the last one's end (process start-up excluded)
    starts = [r["ended"] - r["train_seconds"] for r in results]
    wall = max(r["ended"] for r in results) - min(starts)
    tokens = sum(r["tokens"] for r in results)
    return {"mode": mode, "k": len(specs), "oom": False, "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "peak_mb": sum(r["peak_mb"] for r in results),
            "held_mb": sum(r["held_mb"] for r in results)}  # fmt: skip


def check_targets(rows: list[dict[str, Any]], device: str) -> list[tuple[str, str, bool]]:
    def get(mode: str, k: int) -> dict[str, Any] | None:
        return next((r for r in rows if r["mode"] == mode and r["k"] == k), None)

    checks = []
    ks = sorted({r["k"] for r in rows})
    gpu = device.startswith("cuda")
    for k in ks:
        co, old = get("cotrain", k), get("cotrain_bcopy", k)
        if co is not None and old is not None and not co["oom"] and not old["oom"]:
            checks.append((f"K={k}: held for backward, delta scaling <= scaled B copies",
                           f"{co['held_mb']:.1f} vs {old['held_mb']:.1f} MB (peak {co['peak_mb']:.0f} vs "
                           f"{old['peak_mb']:.0f} MB)", co["held_mb"] <= old["held_mb"]))  # fmt: skip
        co, conc = get("cotrain", k), get("concurrent", k)
        if k == 1 or co is None or conc is None or co["oom"]:
            continue
        if conc["oom"]:
            checks.append((f"K={k}: co-trained fits, concurrent solo does not", "OOM", True))
            continue
        speed, memory = co["tokens_per_s"] / conc["tokens_per_s"], co["peak_mb"] / conc["peak_mb"]
        wanted = 1.3 if gpu and k == 8 else 1.0
        checks.append((f"K={k}: co-trained / concurrent solo tokens/s >= {wanted}", f"{speed:.2f}x", speed >= wanted))
        if gpu and k == 8:
            checks.append(
                (f"K={k}: co-trained / concurrent summed peak memory <= 0.4", f"{memory:.2f}x", memory <= 0.4)
            )
    return checks


def print_table(rows: list[dict[str, Any]], checks: list[tuple[str, str, bool]], meta: dict[str, Any]) -> None:
    print(f"\nco-training benchmark: {meta['base']} ({meta['quant']}) on {meta['device_name']}, {meta['steps']} steps x "
          f"micro-batch {meta['micro_batch']} per adapter, r={meta['rank']}, {meta['date']}")  # fmt: skip
    print(f"{'K':>3} {'mode':13} {'tokens':>9} {'wall s':>8} {'s/adapter':>9} {'tokens/s':>9} {'x conc.':>8} "
          f"{'x seq.':>7} {'peak MB':>9} {'mem x conc.':>11} {'held MB':>8}")  # fmt: skip
    for r in rows:
        if r["oom"]:
            print(f"{r['k']:>3} {r['mode']:13} {'out of memory':>9}")
            continue
        peers = {p["mode"]: p for p in rows if p["k"] == r["k"] and not p["oom"]}
        conc, seq = peers.get("concurrent"), peers.get("sequential")
        x_conc = f"{r['tokens_per_s'] / conc['tokens_per_s']:.2f}" if conc else "-"
        x_seq = f"{r['tokens_per_s'] / seq['tokens_per_s']:.2f}" if seq else "-"
        mem = f"{r['peak_mb'] / conc['peak_mb']:.2f}" if conc else "-"
        print(f"{r['k']:>3} {r['mode']:13} {r['tokens']:>9} {r['wall_s']:>8.1f} {r['wall_s'] / r['k']:>9.2f} "
              f"{r['tokens_per_s']:>9.0f} {x_conc:>8} {x_seq:>7} {r['peak_mb']:>9.0f} {mem:>11} "
              f"{r['held_mb']:>8.1f}")  # fmt: skip
    for name, value, ok in checks:
        print(f"  {'MET   ' if ok else 'MISSED'} {name}: {value}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        print(RESULT + json.dumps(run_worker(json.loads(args.worker))), flush=True)
        return 0
    from tqdm import tqdm

    ks = [int(k) for k in args.k.split(",")]
    modes = [m for m in ("cotrain", "cotrain_bcopy", "sequential", "concurrent") if m not in args.skip.split(",")]
    rows = []
    for k, mode in tqdm([(k, m) for k in ks for m in modes], desc="cases", unit="case"):
        rows.append(run_case(args, mode, trial_specs(args, k)))
    import torch

    meta = {"base": args.base, "quant": args.quant, "steps": args.steps, "micro_batch": args.micro_batch,
            "rank": args.rank, "date": dt.date.today().isoformat(),
            "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda")
            else f"CPU ({os.cpu_count()} cores, {args.threads} threads per case)"}  # fmt: skip
    checks = check_targets(rows, args.device)
    print_table(rows, checks, meta)
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows, "checks": checks}, indent=2))
    return 1 if args.strict and not all(ok for _, _, ok in checks) else 0


if __name__ == "__main__":
    raise SystemExit(main())
