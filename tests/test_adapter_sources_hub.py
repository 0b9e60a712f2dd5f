"""Hugging Face Hub adapter source (issue 18 item 2), offline: a local folder in huggingface_hub's cache layout
(`models--org--name/refs/<rev>` -> `snapshots/<commit>/`) stands in for the Hub; HF_HUB_OFFLINE=1 (tests/conftest.py)
makes `snapshot_download` read only that cache. Checks the allow-list, the id grammar (never a path or URL), the
safety rules (safetensors only, size limit, config checked) and the registry's resolve -> fetch path.

    .venv/bin/python -m pytest -q tests/test_adapter_sources_hub.py
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from adapters.lora_files import AdapterRejected
from adapters.registry import AdapterRegistry, UnknownAdapter
from adapters.sources.hf_hub import HubSource, parse_hub_id

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def put_in_cache(cache: Path, repo: str, adapter: Path, revision: str = "main") -> Path:
    """Lay `adapter`'s files out as huggingface_hub caches a downloaded repo; returns the snapshot folder."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / COMMIT
    snapshot.mkdir(parents=True, exist_ok=True)
    for file in adapter.iterdir():
        shutil.copy2(file, snapshot / file.name)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / revision).write_text(COMMIT)
    return snapshot


@pytest.fixture
def adapter(tmp_path: Path, tiny_shapes) -> Path:
    from adapters.random_adapter import write_random_adapter

    return write_random_adapter(tmp_path / "adapter", tiny_shapes, rank=4, seed=2)


def test_ids_are_never_paths_or_urls() -> None:
    assert parse_hub_id("my-org/sentiment-lora") == ("my-org/sentiment-lora", None)
    assert parse_hub_id("my-org/lora.v2@v1.0") == ("my-org/lora.v2", "v1.0")
    for bad in ("../etc", "org/..", "org/../x", "/abs/path", "org/name/extra", "http://x/y", "s3://b/k", "org/",
                "org/name@../x", "~/x", "org\\name", "org/na me"):  # fmt: skip
        assert parse_hub_id(bad) is None, bad
    with pytest.raises(ValueError, match="allow-list entry"):
        HubSource(["*"])


def test_allowed_repo_resolves_and_fetches_from_the_cache(tmp_path: Path, adapter: Path) -> None:
    cache = tmp_path / "hub"
    snapshot = put_in_cache(cache, "my-org/sentiment-lora", adapter)
    source = HubSource(["my-org/*"], cache_dir=cache)
    ref = source.resolve("my-org/sentiment-lora")
    assert ref is not None and ref.id == "hub:my-org/sentiment-lora@main" and ref.source == "hub"
    assert source.fetch(ref) == snapshot
    assert source.resolve("other-org/sentiment-lora") is None  # not allowed: a client cannot make us fetch it
    missing = source.resolve("my-org/not-cached")
    with pytest.raises(FileNotFoundError, match="my-org/not-cached"):  # offline, not in the cache
        source.fetch(missing)


def test_unsafe_repos_are_refused(tmp_path: Path, adapter: Path) -> None:
    cache = tmp_path / "hub"
    pickled = put_in_cache(cache, "my-org/pickled", adapter)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    source = HubSource(["my-org/*"], cache_dir=cache, max_bytes=10_000_000)
    with pytest.raises(AdapterRejected, match="adapter_model.safetensors is missing"):
        source.fetch(source.resolve("my-org/pickled"))
    put_in_cache(cache, "my-org/big", adapter)
    small = HubSource(["my-org/*"], cache_dir=cache, max_bytes=100)
    with pytest.raises(AdapterRejected, match="limit 100"):
        small.fetch(small.resolve("my-org/big"))


def test_registry_serves_allowed_hub_repos_only(tmp_path: Path, adapter: Path) -> None:
    cache = tmp_path / "hub"
    snapshot = put_in_cache(cache, "my-org/sentiment-lora", adapter)
    registry = AdapterRegistry("tiny-llama", hub_allowed=["my-org/sentiment-lora"], hub_cache_dir=cache)
    ref = registry.resolve("my-org/sentiment-lora")
    assert registry.fetch(ref) == snapshot and registry.ref_for_id(ref.id) == ref
    assert [r.id for r in registry.list_refs()] == [ref.id]
    with pytest.raises(UnknownAdapter):
        registry.resolve("my-org/other")
    with pytest.raises(UnknownAdapter):
        AdapterRegistry("tiny-llama").resolve("my-org/sentiment-lora")  # no allow-list: no hub source
