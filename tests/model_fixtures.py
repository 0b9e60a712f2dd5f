"""Shared model fixtures: the tiny random Llama (and SmolLM2 when a test asks for it), loaded once per session."""

from __future__ import annotations

import pytest

from adapters.base_models import LoadedBase, load_base
from adapters.lora_files import BaseShapes


@pytest.fixture(scope="session")
def tiny_base() -> LoadedBase:
    return load_base("tiny-llama")


@pytest.fixture(scope="session")
def tiny_shapes(tiny_base: LoadedBase) -> BaseShapes:
    return BaseShapes.from_config(tiny_base.model.config, tiny_base.fingerprint, tiny_base.name)


@pytest.fixture(scope="session")
def smollm2_base() -> LoadedBase:
    return load_base("smollm2-135m")
