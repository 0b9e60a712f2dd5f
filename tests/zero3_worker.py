"""One rank of a 2-process DeepSpeed ZeRO-3 training run on CPU (gloo), for tests/test_zero3.py.

    RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 python tests/zero3_worker.py OUT

Trains the tiny Llama with `jobs.train_loop.train` under ZeRO-3 twice in the same processes (imports and DeepSpeed's
op build cost once): a straight run (4 steps, a checkpoint at step 2, rank 0 then evaluates on a fresh unsharded
base) into OUT/straight, and a run resumed from that checkpoint into OUT/resumed. Each rank copies its checkpoint
folder into OUT/ckpt-step2, the way Ray Train merges the folders every rank reports. Each rank writes
OUT/rank<r>.json: what it held of the base right after loading, and both runs' outcomes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>` prints where a hung rank is
    import torch
    import torch.distributed as dist

    from jobs import model_setup
    from jobs.config import SweepConfig
    from jobs.train_loop import PrintHooks, train

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.manual_seed(0)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    config = SweepConfig(name="z3", base_model="tiny-llama", tasks=["sentiment"],
                         lora={"r": 4, "alpha": 8, "dropout": 0.0},
                         training={"max_steps": 4, "micro_batch_size": 2, "learning_rate": 1e-3, "warmup_steps": 1,
                                   "log_every": 1, "checkpoint_every": 2},
                         evaluation={"max_examples": 4, "max_new_tokens": 4, "batch_size": 8},
                         deepspeed={"stage": 3})  # fmt: skip
    spec = config.trials()[0]
    seen: dict[str, object] = {}
    build_peft_model = model_setup.build_peft_model

    def recording(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202  what this rank holds of the base once loaded
        base, model = build_peft_model(*args, **kwargs)
        proj = base.model.model.layers[0].mlp.down_proj
        weight = getattr(proj, "base_layer", proj).weight
        seen["base_local_numel"] = int(weight.numel())
        seen["base_full_shape"] = list(getattr(weight, "ds_shape", weight.shape))
        return base, model

    model_setup.build_peft_model = recording

    class Hooks(PrintHooks):
        def checkpoint(self, step, folder, metrics):  # noqa: ANN001
            if folder is not None:
                shutil.copytree(folder, args.out / f"ckpt-step{step}", dirs_exist_ok=True)

    straight = train(spec, Hooks(), args.out / "straight", rank=rank, world=world, device="cpu")
    dist.barrier()  # every rank's shard is in ckpt-step2 now
    resumed = train(spec, PrintHooks(), args.out / "resumed", resume=args.out / "ckpt-step2", rank=rank, world=world,
                    device="cpu", final_eval=False)  # fmt: skip
    for name, outcome in (("straight", straight), ("resumed", resumed)):
        seen[name] = {"steps": outcome.steps, "adapter_score": outcome.adapter_score, "loss": outcome.train_loss}
    (args.out / f"rank{rank}.json").write_text(json.dumps(seen))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
