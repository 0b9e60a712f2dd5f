"""Adapter folders that must be refused, written next to good ones in a test catalog: `corrupt` (a safetensors
header that is not JSON), `pickled` (only a pickle `adapter_model.bin`) and `nan` (valid safetensors, NaN weights).
Each copies the good adapter's `adapter_config.json`, so only the weights are wrong. Used by tests/test_api.py and
tests/test_serve_http.py; nothing runs at import."""

from __future__ import annotations

import shutil
from pathlib import Path

KINDS = ("corrupt", "pickled", "nan")


def write_bad_adapters(root: Path, good: Path, kinds: tuple[str, ...] = KINDS) -> None:
    """Write one folder per kind under `root`, derived from the good adapter folder `good`."""
    for kind in kinds:
        (root / kind).mkdir()
        shutil.copy(good / "adapter_config.json", root / kind)
    if "corrupt" in kinds:
        (root / "corrupt" / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    if "pickled" in kinds:
        (root / "pickled" / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
    if "nan" in kinds:
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(good / "adapter_model.safetensors"))
        first = sorted(tensors)[0]
        tensors[first] = tensors[first] * float("nan")
        save_file(tensors, str(root / "nan" / "adapter_model.safetensors"), metadata={"format": "pt"})
