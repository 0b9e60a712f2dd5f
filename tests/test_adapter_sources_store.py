"""Object-storage adapter source (issue 18 item 2) through fsspec, on fsspec's local filesystem (`file://` prefixes,
a mounted share; fast, no server). The same source against a real S3-compatible server (moto) through s3fs, served
over HTTP token for token like the catalog copy, is tests/test_s3_store.py. Checks the allowed-prefix rule
(one adapter folder directly under a prefix, never another path or URL), the safety rules (safetensors only, size
limit) and the registry's resolve -> fetch path, with a new version when the weights change.

    .venv/bin/python -m pytest -q tests/test_adapter_sources_store.py
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from adapters.lora_files import AdapterRejected
from adapters.registry import AdapterRegistry, UnknownAdapter
from adapters.sources.object_store import ObjectStoreSource


@pytest.fixture
def bucket(tmp_path: Path, tiny_shapes, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`<tmp>/bucket/adapters/sentiment/` holding a random adapter; the lorafleet cache in tmp too."""
    from adapters.random_adapter import write_random_adapter

    monkeypatch.setenv("LORAFLEET_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "bucket" / "adapters"
    write_random_adapter(root / "sentiment", tiny_shapes, rank=4, seed=3)
    return root


def test_only_folders_directly_under_an_allowed_prefix(bucket: Path) -> None:
    prefix = f"file://{bucket}/"
    source = ObjectStoreSource([prefix])
    assert source.resolve(prefix + "sentiment") is not None
    for bad in (f"file://{bucket}/../adapters/sentiment", f"file://{bucket}/sentiment/../../x", f"file://{bucket}/a/b",
                f"file://{bucket.parent}/other", "s3://bucket/adapters/sentiment", "/etc/passwd", "sentiment"):  # fmt: skip
        assert source.resolve(bad) is None, bad
    assert source.resolve(prefix + "missing") is None
    with pytest.raises(ValueError, match="must start with"):
        ObjectStoreSource(["http://example.com/adapters/"])
    with pytest.raises(ValueError, match="end with"):
        ObjectStoreSource(["s3://bucket/adapters"])


def test_fetch_copies_the_adapter_files_once_per_content(bucket: Path) -> None:
    prefix = f"file://{bucket}/"
    registry = AdapterRegistry("tiny-llama", store_prefixes=[prefix])
    ref = registry.resolve(prefix + "sentiment")
    folder = registry.fetch(ref)
    for file in ("adapter_config.json", "adapter_model.safetensors"):
        assert (folder / file).read_bytes() == (bucket / "sentiment" / file).read_bytes()
    assert registry.ref_for_id(ref.id) == ref and [r.id for r in registry.list_refs()] == [ref.id]
    weights = bucket / "sentiment" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes() + b" ")  # new content: a new id, fetched again
    changed = registry.resolve(prefix + "sentiment")
    assert changed.id != ref.id and registry.fetch(changed) != folder
    with pytest.raises(UnknownAdapter):
        AdapterRegistry("tiny-llama").resolve(prefix + "sentiment")  # no prefix configured: not a model id


def test_unsafe_adapters_are_refused(bucket: Path) -> None:
    prefix = f"file://{bucket}/"
    shutil.copytree(bucket / "sentiment", bucket / "pickled")
    (bucket / "pickled" / "adapter_model.safetensors").rename(bucket / "pickled" / "adapter_model.bin")
    source = ObjectStoreSource([prefix])
    assert source.resolve(prefix + "pickled") is None  # no safetensors: not an adapter here
    small = ObjectStoreSource([prefix], max_bytes=100)
    with pytest.raises(AdapterRejected, match="limit 100"):
        small.fetch(small.resolve(prefix + "sentiment"))
    (bucket / "sentiment" / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterRejected, match="adapter_config.json"):
        source.fetch(source.resolve(prefix + "sentiment"))
