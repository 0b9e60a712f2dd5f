"""A CPU LoraEngine on the tiny random Llama with a few random adapters registered, for the engine tests
(tests/test_engine_paged.py, tests/test_engine_graphs.py). No fixtures, nothing runs at import.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adapters.random_adapter import write_random_adapter
from serve_app.engine import EngineConfig, LoraEngine


def write_adapters(root: Path, shapes: Any, specs: dict[str, dict[str, Any]]) -> dict[str, Path]:
    """One random adapter per entry of `specs` (name -> write_random_adapter keyword arguments) under `root`."""
    return {name: write_random_adapter(root / name, shapes, **kw) for name, kw in specs.items()}


def cpu_engine(base: Any, dirs: dict[str, Path], **config: Any) -> LoraEngine:
    """An engine on CPU (no side thread, rank up to 16, 128-token sequences unless `config` says otherwise) with
    every adapter of `dirs` registered under its name."""
    engine = LoraEngine(base, EngineConfig(**{"device": "cpu", "max_lora_rank": 16, "max_seq_len": 128,
                                              "lora_overlap": "off", **config}))  # fmt: skip
    for name, folder in dirs.items():
        engine.register_adapter(name, folder)
    return engine
