"""Storage and environment for a real cluster: `storage_path` resolved once by the driver, URIs opened through
pyarrow/fsspec, relative or node-local paths refused on a multi-node cluster (naming the field), a real two-raylet
Ray cluster's per-node visibility probe, the cluster runtime env (Hub online) kept in step with the local one
(offline), and cloud GPU types whose memory fits the A100 config's packing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from jobs.gpu_share import memory_fraction
from jobs.storage import (
    StorageError,
    check_shared_storage,
    check_uri_scheme,
    resolve_storage,
    storage_filesystem,
)

ROOT = Path(__file__).resolve().parents[1]


def test_storage_is_resolved_once_against_the_drivers_directory(tmp_path: Path) -> None:
    assert resolve_storage(".lorafleet/runs", cwd=tmp_path) == str(tmp_path / ".lorafleet/runs")
    assert resolve_storage("/shared/runs", cwd=tmp_path) == "/shared/runs"
    assert resolve_storage("~/runs").startswith(str(Path.home()))
    for uri in ("s3://bucket/lorafleet/runs", "gs://b/r", "file:///mnt/shared/runs"):
        assert resolve_storage(uri, cwd=tmp_path) == uri


def test_uris_go_through_pyarrow_or_fsspec() -> None:
    import pyarrow.fs

    fs, path = storage_filesystem("s3://bucket/lorafleet/runs?region=us-east-1&endpoint_override=127.0.0.1:9")
    assert isinstance(fs, pyarrow.fs.S3FileSystem) and path == "bucket/lorafleet/runs"
    fs, path = storage_filesystem("memory://lorafleet-test/runs")  # no pyarrow filesystem: fsspec's, wrapped
    assert isinstance(fs, pyarrow.fs.PyFileSystem)
    fs.create_dir(path)
    with fs.open_output_stream(f"{path}/ckpt.txt") as out:
        out.write(b"step 2")
    with fs.open_input_stream(f"{path}/ckpt.txt") as back:
        assert back.read() == b"step 2"
    with pytest.raises(StorageError, match=r"^storage_path: 'nosuch://x/y': no filesystem"):
        storage_filesystem("nosuch://x/y")
    check_uri_scheme("s3://bucket/runs")
    check_uri_scheme("memory://x")
    with pytest.raises(StorageError, match=r"^storage_path: .*unknown scheme 'nosuch'"):
        check_uri_scheme("nosuch://x/y")


def test_relative_or_node_local_storage_is_refused_on_a_multi_node_cluster(tmp_path: Path) -> None:
    seen: list[Path] = []

    def every_node_sees(marker: Path) -> bool:
        seen.append(marker)
        return marker.exists()

    check_shared_storage("runs", 1, every_node_sees)  # one node: a relative path is fine (resolved by the driver)
    with pytest.raises(StorageError, match=r"^storage_path: 'runs' is relative; on a cluster of 2 nodes"):
        check_shared_storage("runs", 2, every_node_sees)
    with pytest.raises(StorageError, match=r"^storage_path: .* is local to the driver's node"):
        check_shared_storage(str(tmp_path / "local"), 3, lambda marker: False)
    check_shared_storage(str(tmp_path / "shared"), 2, every_node_sees)
    assert seen and not seen[-1].exists()  # the marker was there while probed, and is removed afterwards
    check_shared_storage("s3://bucket/runs", 5, lambda marker: False)  # URIs are not probed


@pytest.mark.slow
def test_the_visibility_probe_runs_a_task_on_every_node_of_a_real_two_node_cluster(tmp_path: Path) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from jobs.storage import alive_ray_nodes, ray_visible_on_every_node

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address)
        cluster.wait_for_nodes()
        assert alive_ray_nodes() == 2
        marker = tmp_path / "marker"
        assert ray_visible_on_every_node(marker) is False
        marker.write_text("x")
        assert ray_visible_on_every_node(marker) is True  # one host: both raylets see tmp_path
        check_shared_storage(str(tmp_path / "runs"), alive_ray_nodes(), ray_visible_on_every_node)
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_the_cluster_runtime_env_is_the_local_one_with_the_hub_online() -> None:
    local = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
    remote = yaml.safe_load((ROOT / "cluster" / "runtime_env_cluster.yaml").read_text())
    assert local["env_vars"].pop("HF_HUB_OFFLINE") == "1" and remote["env_vars"].pop("HF_HUB_OFFLINE") == "0"
    assert local == remote
    assert not any(
        re.search(r"HF_TOKEN|SECRET|API_KEY|PASSWORD", name) for name in remote["env_vars"]
    )  # tokens come from the nodes
    for launcher in ("aws-a100.yaml", "gcp-a100.yaml"):
        text = (ROOT / "cluster" / launcher).read_text()
        assert (
            "--runtime-env cluster/runtime_env_cluster.yaml" in text
            and "runtime-env cluster/runtime_env.yaml " not in text
        )
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Run on a Ray cluster") : readme.index("## Run on Kubernetes")]
    submits = re.findall(r"--runtime-env (\S+)", section)
    assert submits and set(submits) == {"cluster/runtime_env_cluster.yaml"}


# One packed QLoRA worker of jobs/configs/a100-mistral7b.yaml, as written out in cluster/aws-a100.yaml: 7.43 GB
# training peak (measured, ../shared/README.md) + ~4.9 GB eval KV cache + ~0.5 GB CUDA context.
WORKER_GB = 12.8
GPU_GB = {"p4de.24xlarge": 80, "p4d.24xlarge": 40, "a2-ultragpu-8g": 80, "a2-highgpu-8g": 40}


def test_cloud_gpu_types_fit_the_a100_configs_packing() -> None:
    config = yaml.safe_load((ROOT / "jobs" / "configs" / "a100-mistral7b.yaml").read_text())
    share = memory_fraction(config["resources"]["gpus_per_worker"])
    assert share is not None
    for launcher, key in (("aws-a100.yaml", "InstanceType"), ("gcp-a100.yaml", "machineType")):
        nodes = yaml.safe_load((ROOT / "cluster" / launcher).read_text())["available_node_types"]
        gpu_nodes = [n["node_config"][key] for n in nodes.values() if n.get("resources", {}).get("GPU")]
        assert gpu_nodes
        for machine in gpu_nodes:
            assert share * GPU_GB[machine] >= WORKER_GB, f"{launcher}: {machine} cannot hold the packed workers"
    assert memory_fraction(0.25) * GPU_GB["p4d.24xlarge"] < WORKER_GB  # why p4d is not used at 0.25
    assert memory_fraction(0.5) * GPU_GB["p4d.24xlarge"] >= WORKER_GB  # the documented 40 GB alternative


def test_trainers_take_the_drivers_resolved_path_and_never_resolve_their_own() -> None:
    from jobs.config import SweepConfig
    from jobs.ray_train import fit_trainer

    config = SweepConfig(name="s", base_model="tiny-llama", tasks=["sentiment"], storage_path="relative/runs")
    with pytest.raises(ValueError, match=r"storage_path 'relative/runs' must be absolute or a URI here"):
        fit_trainer(config, lambda loop_config: None, {}, "s-sentiment", 1, [], "outcome.json")
