"""A real two-node Ray cluster on this host: the session's local stack head (4 CPUs) plus a worker raylet added with
`lorafleet add-node` (3 CPUs, custom resource `lorafleet_b`), both on 127.0.0.1 with their own temp dirs and ports.

    pytest tests/test_multinode.py

Checks that a sweep's two adapters train on different nodes (each MLflow run tags its `ray_node_id`; 3 CPUs per
worker fit one trainer per node) with checkpoints under one `storage_path` both nodes see, that a Serve replica
pinned to the second node answers with an adapter the sweep registered (weights fetched from MLflow, nothing shared
with the driver but the MLflow URL) exactly as PEFT does, that one adapter trained by 2 DDP workers (one per node)
equals the plain loop's 1 worker at the same global batch (within DDP_TOLERANCE), that killing node b mid-sweep moves
its trial to the head, resumed from its last recorded checkpoint in the same MLflow run (one registry version per
adapter), and that forgetting the node (what `lorafleet down` does per node) leaves no process behind. Quick checks
of `--resources` parsing too.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from cluster import worker_node
from cluster.processes import tree_members
from cluster.stack_state import StackError, StackInfo

REPO_ROOT = Path(__file__).resolve().parents[1]
NODE_RESOURCE = "lorafleet_b"
MAX_NEW = 8


def _nodes(stack: StackInfo) -> list[dict[str, Any]]:
    with httpx.Client(trust_env=False, timeout=30) as http:
        body = http.get(f"{stack.dashboard_url}/api/v0/nodes?limit=1000&detail=true").json()
    return body["data"]["result"]["result"]


def _committed_step(trainer_dir: Path) -> int:
    """The step of the latest checkpoint Ray Train's controller has recorded for one TorchTrainer (its snapshot in
    storage, which a retried trainer with the same name restores from); 0 if none yet."""
    try:
        state = json.loads((trainer_dir / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, ValueError):
        return 0
    return int(((state.get("latest_checkpoint_result") or {}).get("metrics") or {}).get("step", 0))


@pytest.fixture(scope="module")
def node_b(local_stack: StackInfo) -> Iterator[worker_node.WorkerNode]:
    """A second node joined with the CLI; stopped by PID (as `lorafleet down` does) at the end of the module."""
    name = f"b{uuid.uuid4().hex[:6]}"
    command = [sys.executable, "-m", "cluster.cli", "add-node", "--state-dir", local_stack.state_dir, "--num-cpus",
               "3", "--resources", f'{{"{NODE_RESOURCE}": 1}}', "--name", name, "--timeout", "300"]  # fmt: skip
    added = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=400)
    recorded = {n.name: n for n in worker_node.read_workers(local_stack.state_dir).nodes}
    try:
        assert added.returncode == 0, added.stdout + added.stderr
        assert f"Node {name} joined" in added.stdout
        yield recorded[name]
    finally:
        if name in {n.name for n in worker_node.read_workers(local_stack.state_dir).nodes}:
            worker_node.stop_node(local_stack.state_dir, name)


@pytest.mark.slow
def test_added_node_joins_on_loopback_with_its_resources(
    local_stack: StackInfo, node_b: worker_node.WorkerNode
) -> None:
    nodes = {n["node_id"]: n for n in _nodes(local_stack) if n["state"] == "ALIVE"}
    assert len(nodes) == 2 and node_b.node_id in nodes
    mine = nodes[node_b.node_id]
    assert mine["node_ip"] == "127.0.0.1" and not mine["is_head_node"]
    assert mine["resources_total"]["CPU"] == 3 and mine["resources_total"][NODE_RESOURCE] == 1
    assert Path(node_b.temp_dir) != Path(local_stack.ray_temp_dir)
    assert node_b.ports.node_manager != local_stack.ray_ports.node_manager


@pytest.fixture(scope="module")
def two_node_sweep(local_stack: StackInfo, node_b: worker_node.WorkerNode, tmp_path_factory) -> dict[str, Any]:
    """Two adapters, one trainer worker of 3 CPUs each: the head (4 CPUs) and node b (3 CPUs) take one each."""
    from test_sweep_cluster import submit, sweep_config

    tmp = tmp_path_factory.mktemp("multinode")
    path, config = sweep_config(tmp, local_stack, **{"resources.cpus_per_worker": 3, "training.max_steps": 4,
                                                     "training.checkpoint_every": 2})  # fmt: skip
    result = submit(local_stack, path)
    return {"config": config, "result": result, "output": result.stdout + result.stderr}


@pytest.mark.slow
def test_sweep_trains_on_both_nodes_into_one_storage_path(
    local_stack: StackInfo, node_b: worker_node.WorkerNode, two_node_sweep: dict[str, Any]
) -> None:
    from test_sweep_cluster import child_runs

    assert two_node_sweep["result"].returncode == 0, two_node_sweep["output"][-4000:]
    config = two_node_sweep["config"]
    runs = child_runs(local_stack, config["mlflow"]["experiment"])
    assert len(runs) == 2 and all(r.data.tags.get("lorafleet.done") == "true" for r in runs)
    head_id = next(n["node_id"] for n in _nodes(local_stack) if n["is_head_node"])
    assert {r.data.tags["ray_node_id"] for r in runs} == {head_id, node_b.node_id}
    storage = Path(config["storage_path"])
    for task in config["tasks"]:
        trainer_dir = storage / f"{config['name']}-{task}"
        assert sorted(p.name for p in trainer_dir.rglob("checkpoint_*") if p.is_dir()), f"no checkpoint of {task}"


@pytest.mark.slow
def test_serve_replica_on_node_b_serves_a_registered_adapter(
    local_stack: StackInfo, node_b: worker_node.WorkerNode, two_node_sweep: dict[str, Any], tiny_base, tmp_path
) -> None:
    from peft_reference import peft_greedy
    from serve_helpers import app_config, deploy, http_client, replica_details, shutdown
    from test_sweep_cluster import client

    assert two_node_sweep["result"].returncode == 0, two_node_sweep["output"][-2000:]
    prefix = two_node_sweep["config"]["mlflow"]["registry_prefix"]
    adapter = f"{prefix}sentiment"
    model = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 1, "resources": {NODE_RESOURCE: 1}}}
    args = {"base_model": "tiny-llama", "mlflow_tracking_uri": local_stack.mlflow_url, "catalog_dir": None,
            "engine": {"max_seq_len": 256, "max_loras": 2, "max_running": 4}}  # fmt: skip
    app = app_config("multinode", "/", args, model)
    try:
        deploy(local_stack, [app], timeout=300)
        (replica,) = replica_details(local_stack, "multinode", "LoraModel")
        assert replica["node_id"] == node_b.node_id
        with http_client(timeout=120) as http:
            response = http.post(f"{local_stack.serve_url}/v1/completions",
                                 json={"model": adapter, "prompt": "hello", "max_tokens": MAX_NEW, "temperature": 0})  # fmt: skip
        assert response.status_code == 200, response.text
        body = response.json()
    finally:
        shutdown(local_stack)
    (version,) = client(local_stack).search_model_versions(f"name='{adapter}'")
    folder = client(local_stack).download_artifacts(version.run_id, "adapter", str(tmp_path))
    tokenizer = tiny_base.tokenizer
    (want,) = peft_greedy(tiny_base, {adapter: Path(folder)}, [(tokenizer("hello").input_ids, adapter)], MAX_NEW,
                          {tokenizer.eos_token_id})  # fmt: skip
    assert body["usage"]["completion_tokens"] == len(want)
    decoded = tokenizer.decode(want, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    text = body["choices"][0]["text"]
    assert decoded.startswith(text) and set(decoded[len(text) :]) <= {"\ufffd"}


# DDP vs one worker: max |difference| of any LoRA weight after DDP_STEPS steps (lr 1e-3, fp32). Measured on this
# machine (2026-12-04, 3 runs): 3.5e-5. The same one-worker run regrouped (micro-batches of 30 vs 15 x 2
# accumulated, mathematically the same step) already differs by 1.3e-5, in one element of 8,960 above 1e-6: AdamW
# divides each gradient by its own magnitude + eps (1e-8), so an element whose gradient is ~1e-9 moves by up to ~10%
# of lr on float rounding. A different global batch (15 rows a step) moves the weights by 3.4e-3, 34x the tolerance.
# Before the loss was normalised over all ranks' tokens, 2-rank DDP of the same loop (gloo, one host) differed by
# 4.0e-3.
DDP_TOLERANCE = 1e-4
DDP_STEPS = 4


def _train_worker_nodes(stack: StackInfo) -> dict[str, str]:
    """actor id -> node id of every RayTrainWorker the cluster has seen (dead ones included)."""
    from ray.util.state import list_actors

    actors = list_actors(address=stack.dashboard_url, filters=[("class_name", "=", "RayTrainWorker")], limit=10_000)
    return {a.actor_id: a.node_id for a in actors}


def _max_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow
def test_ddp_over_two_nodes_matches_one_worker_at_the_same_global_batch(
    local_stack: StackInfo, node_b: worker_node.WorkerNode, tmp_path: Path
) -> None:
    """One adapter, 2 DDP workers of 3 CPUs (no node has 6: one on the head, one on node b, gloo between them),
    15 rows each per step, against the plain training loop with 1 worker accumulating 2 x 15 rows. Each step covers
    the whole 30-row training split, so both see the same rows per step (workers shard rows rank::world and shuffle
    their own shard: at a global batch smaller than the split the two would see different rows by design).
    LoRA dropout 0: dropout masks are random per process."""
    from safetensors.torch import load_file
    from test_sweep_cluster import child_runs, client, submit, sweep_config, user_task

    from adapters.lora_files import WEIGHTS_FILE
    from jobs.config import load_config
    from jobs.train_loop import PrintHooks, train

    overrides = {"training.max_steps": DDP_STEPS, "training.micro_batch_size": 15, "training.grad_accum": 1,
                 "training.checkpoint_every": 100, "resources.workers_per_adapter": 2,
                 "resources.cpus_per_worker": 3}  # fmt: skip
    path, config = sweep_config(tmp_path, local_stack, tasks={"triage": user_task(tmp_path / "data")},
                                lora={"r": 4, "alpha": 8, "dropout": 0.0}, **overrides)  # fmt: skip
    before = _train_worker_nodes(local_stack)
    result = submit(local_stack, path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    ours = {a: n for a, n in _train_worker_nodes(local_stack).items() if a not in before}
    head_id = next(n["node_id"] for n in _nodes(local_stack) if n["is_head_node"])
    assert sorted(ours.values()) == sorted([head_id, node_b.node_id])  # one worker on each node, one attempt
    (run,) = child_runs(local_stack, config["mlflow"]["experiment"])
    assert run.data.metrics["final_steps"] == DDP_STEPS
    ddp = load_file(str(Path(client(local_stack).download_artifacts(run.info.run_id, "adapter", str(tmp_path)))
                        / WEIGHTS_FILE))  # fmt: skip

    spec = load_config(path).trials()[0]
    adapters = {}
    for name, micro, accum in (("one", 15, 2), ("other_batch", 15, 1)):
        t = spec.training.model_copy(update={"micro_batch_size": micro, "grad_accum": accum})
        train(spec.model_copy(update={"training": t}), PrintHooks(), tmp_path / name, final_eval=False)
        adapters[name] = load_file(str(tmp_path / name / WEIGHTS_FILE))
    same, other = _max_diff(ddp, adapters["one"]), _max_diff(ddp, adapters["other_batch"])
    print(f"DDP 2 workers vs 1 worker: max |dW| {same:.2e} (tolerance {DDP_TOLERANCE:g}); vs another batch {other:.2e}")
    assert same < DDP_TOLERANCE
    assert other > 10 * DDP_TOLERANCE  # the comparison can tell batches apart


@pytest.mark.slow
def test_killed_node_trials_resume_on_the_survivor(
    local_stack: StackInfo, node_b: worker_node.WorkerNode, tmp_path: Path
) -> None:
    """SIGKILL every process of node b once an adapter it trains has a checkpoint recorded: the trial resumes on
    the head from that checkpoint, in the same MLflow run, and each adapter gets exactly one registry version."""
    from ray.job_submission import JobStatus, JobSubmissionClient
    from test_sweep_cluster import child_runs, client, submit, sweep_config

    path, config = sweep_config(tmp_path, local_stack, max_failures=2, **{"resources.cpus_per_worker": 3,
                                "training.max_steps": 32, "training.checkpoint_every": 4})  # fmt: skip
    submitted = submit(local_stack, path, "--no-wait", timeout=120)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job_id = next(w for w in submitted.stdout.split() if w.strip("'").startswith("raysubmit_")).strip("'")
    mlflow, experiment = client(local_stack), config["mlflow"]["experiment"]

    victim, committed, deadline = None, 0, time.monotonic() + 400
    while victim is None and time.monotonic() < deadline:
        for run in child_runs(local_stack, experiment):
            if run.data.tags.get("ray_node_id") == node_b.node_id:
                # a checkpoint is one to resume from once Ray Train's controller has recorded it (up to one poll,
                # 2 s, after the worker wrote it to storage); one written but not yet recorded is not
                committed = _committed_step(Path(config["storage_path"]) / f"{config['name']}-{run.data.tags['task']}")
                victim = run.info.run_id if committed >= 4 else None
        time.sleep(0.3)
    assert victim is not None, "no adapter on node b had a checkpoint recorded"
    for proc in tree_members(node_b.process):  # the node is lost: raylet, agents and workers at once
        with contextlib.suppress(psutil.Error):
            proc.kill()

    jobs = JobSubmissionClient(local_stack.dashboard_url)
    deadline = time.monotonic() + 600
    while not jobs.get_job_status(job_id).is_terminal() and time.monotonic() < deadline:
        time.sleep(2)
    assert jobs.get_job_status(job_id) == JobStatus.SUCCEEDED, jobs.get_job_logs(job_id)[-4000:]
    head_id = next(n["node_id"] for n in _nodes(local_stack) if n["is_head_node"])
    runs = child_runs(local_stack, experiment)
    assert len(runs) == 2 and all(r.data.tags.get("lorafleet.done") == "true" for r in runs)  # no duplicate run
    run = mlflow.get_run(victim)
    assert run.data.tags["ray_node_id"] == head_id  # finished on the surviving node
    (resumed,) = mlflow.get_metric_history(victim, "resumed_from_step")
    assert resumed.value >= committed and resumed.value % 4 == 0  # from its last checkpoint, not from zero
    steps = [m.step for m in mlflow.get_metric_history(victim, "loss")]
    assert steps.count(1) == 1 and sorted(set(steps)) == list(range(1, 33))
    assert run.data.metrics["final_steps"] == 32
    prefix = config["mlflow"]["registry_prefix"]
    for task in config["tasks"]:
        assert len(mlflow.search_model_versions(f"name='{prefix}{task}'")) == 1  # no adapter lost, none twice


@pytest.mark.slow
def test_the_lost_node_is_forgotten_without_leftovers(local_stack: StackInfo, node_b: worker_node.WorkerNode) -> None:
    outcome = worker_node.stop_node(local_stack.state_dir, node_b.name)  # what `lorafleet down` runs per node
    assert not outcome.leftover_pids and not tree_members(node_b.process)
    assert node_b.name not in {n.name for n in worker_node.read_workers(local_stack.state_dir).nodes}
    states = {n["node_id"]: n["state"] for n in _nodes(local_stack)}
    assert states[node_b.node_id] == "DEAD"


@pytest.mark.parametrize(
    ("text", "needle"),
    [("{nope", "not JSON"), ('{"a": -1}', "non-negative"), ('{"CPU": 2}', "--num-cpus"), ("[1]", "object")],
)
def test_bad_resources_are_refused_naming_the_field(text: str, needle: str) -> None:
    with pytest.raises(StackError, match="^resources: ") as err:
        worker_node.parse_resources(text)
    assert needle in str(err.value)


def test_resources_parse_to_floats() -> None:
    assert worker_node.parse_resources('{"lorafleet_b": 1, "disk": 0.5}') == {"lorafleet_b": 1.0, "disk": 0.5}
    assert worker_node.parse_resources("") == {}


def test_down_stops_recorded_nodes_before_the_head(tmp_path: Path) -> None:
    """`lorafleet down` stops what workers.json records (here a stand-in process; the head's records are stale)."""
    from cluster.local_stack import StackConfig, down
    from cluster.processes import ProcessRecord, find_process, spawn_in_new_session
    from cluster.ray_head import RayPorts
    from cluster.stack_state import StackInfo as Info
    from cluster.stack_state import write_stack

    gone = ProcessRecord(pid=2**22 + 1, create_time=0.0, command=["x"], log_path=str(tmp_path / "x.log"))
    ports = RayPorts(gcs=1, dashboard=2, ray_client_server=3, dashboard_agent_listen=4, dashboard_agent_grpc=5,
                     node_manager=6, object_manager=7, metrics_export=8, runtime_env_agent=9, min_worker=10,
                     max_worker=20)  # fmt: skip
    write_stack(Info(state_dir=str(tmp_path), ray_address="127.0.0.1:1", dashboard_url="http://127.0.0.1:2",
                     mlflow_url="http://127.0.0.1:3", serve_url="http://127.0.0.1:4", num_cpus=1, ray_ports=ports,
                     mlflow_port=3, serve_http_port=4, ray_temp_dir=str(tmp_path / "ray"), ray=gone, mlflow=gone,
                     started_at="now"))  # fmt: skip
    stand_in = spawn_in_new_session(["sleep", "300"], env={}, log_path=tmp_path / "node.log")
    node = worker_node.WorkerNode(name="b", node_id="n", num_cpus=1, resources={}, ports=ports,
                                  temp_dir=str(tmp_path / "nodes" / "b"), process=stand_in)  # fmt: skip
    worker_node.workers_file(tmp_path).write_text(worker_node.WorkerNodes(nodes=[node]).model_dump_json())
    report = down(StackConfig(state_dir=tmp_path, stop_timeout_s=5))
    assert report.stopped["node b"].was_running and not report.leftover_pids
    assert find_process(stand_in) is None and worker_node.read_workers(tmp_path).nodes == []
