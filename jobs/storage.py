"""Where a sweep's checkpoints live (`storage_path`), resolved once by the driver and checked before training.

- `resolve_storage`: a URI (`s3://`, `gs://`, `file://`, any scheme Ray Train knows) stays as is; a local path is
  made absolute ONCE, in the sweep driver's working directory, and that absolute path travels to every trial and
  worker (each Ray process has its own working directory, a per-trial copy even on one machine).
- `storage_filesystem`: the filesystem a URI goes through — pyarrow's own (`s3://`, `gs://`, `hdfs://`, `file://`)
  or, for other schemes, an fsspec implementation wrapped for pyarrow, the way Ray Train opens `storage_path`.
  An S3-compatible store (MinIO, ...) is reached through the standard AWS settings in every node's environment:
  `AWS_ENDPOINT_URL` + `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (pyarrow >= 15, boto3 and s3fs read them), or
  per URI `s3://bucket/runs?endpoint_override=host:port&scheme=http` (tests/test_s3_store.py: a real S3 server).
- `check_shared_storage`: on a cluster with more than one alive node, a local path must be one every node sees
  (a shared filesystem): a marker file written by the driver must be visible from a task on each node. A relative
  path is refused outright there; so is a path some node does not see. Either error names `storage_path`.

Not a script; used by jobs/sweep.py and jobs/preflight.py.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


class StorageError(ValueError):
    """A storage_path that cannot work; the message names the field."""


def is_uri(path: str) -> bool:
    return "://" in path


def resolve_storage(path: str, cwd: Path | None = None) -> str:
    """The storage location every process of the sweep uses: URIs unchanged, local paths absolute (against `cwd`,
    default the current directory; `~` expanded)."""
    if is_uri(path):
        return path
    local = Path(path).expanduser()
    return str(local if local.is_absolute() else (cwd or Path.cwd()) / local)


def storage_filesystem(uri: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path inside it) for a storage URI or local path; StorageError naming `storage_path`
    when neither pyarrow nor fsspec can open its scheme."""
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(uri)
    except (pyarrow.ArrowInvalid, pyarrow.ArrowNotImplementedError, ValueError) as arrow_error:
        try:
            import fsspec
            from fsspec.core import split_protocol

            protocol, inner = split_protocol(uri)
            fs = fsspec.filesystem(protocol)
        except (ImportError, ValueError) as err:
            raise StorageError(f"storage_path: {uri!r}: no filesystem for it (pyarrow: {arrow_error}; fsspec: "
                               f"{err})") from None  # fmt: skip
        return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), inner


PYARROW_SCHEMES = frozenset({"file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss"})


def check_uri_scheme(uri: str) -> None:
    """A storage URI whose scheme pyarrow or an installed fsspec implementation can open (no network access)."""
    scheme = uri.split("://", 1)[0].lower()
    if scheme in PYARROW_SCHEMES:
        return
    try:
        from fsspec.registry import known_implementations
    except ImportError:
        known_implementations = {}
    if scheme not in known_implementations:
        raise StorageError(f"storage_path: {uri!r}: unknown scheme {scheme!r}; use a path on a shared filesystem, "
                           "s3://, gs:// or another pyarrow/fsspec filesystem")  # fmt: skip


def check_shared_storage(path: str, alive_nodes: int, visible_on_every_node: Callable[[Path], bool]) -> None:
    """Refuse a relative or node-local `storage_path` when the cluster has more than one alive node.
    `visible_on_every_node(marker)` says whether a file the driver just wrote is seen from every node."""
    if alive_nodes <= 1 or is_uri(path):
        return
    if not Path(path).expanduser().is_absolute():
        raise StorageError(f"storage_path: {path!r} is relative; on a cluster of {alive_nodes} nodes each node "
                           "would resolve it on its own disk; use a shared filesystem path or a URI such as "
                           "s3://bucket/runs")  # fmt: skip
    folder = Path(path).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / f".lorafleet-shared-check-{uuid.uuid4().hex}"
    marker.write_text("written by the sweep driver; every node must see it")
    try:
        if not visible_on_every_node(marker):
            raise StorageError(f"storage_path: {path!r} is local to the driver's node: not every one of the "
                               f"{alive_nodes} alive nodes sees it; use a shared filesystem or a URI such as "
                               "s3://bucket/runs")  # fmt: skip
    finally:
        marker.unlink(missing_ok=True)


def ray_visible_on_every_node(marker: Path) -> bool:
    """Whether `marker` exists as seen from a task pinned to each alive Ray node (ray.init must have run)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def exists(path: str) -> bool:
        return Path(path).exists()

    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    pending = [exists.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(str(marker))
               for node in nodes]  # fmt: skip
    return all(ray.get(pending, timeout=120))


def alive_ray_nodes() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))
