"""Where adapters live: one small class per storage backend, all answering the same three questions.

    resolve(model)  -> AdapterRef | None    which adapter does this `model` string name? (None: not mine)
    fetch(ref)      -> Path                 a local folder with its files (downloaded once, cached)
    list_refs()     -> list[AdapterRef]     what can be served

Backends: `local_catalog.LocalCatalog` (a folder of named adapter folders, for use without MLflow),
`mlflow_registry.MlflowRegistry` (the MLflow Model Registry: `name` = alias champion, `name@alias`, `name/3`),
`hf_hub.HubSource` (Hugging Face Hub `org/name[@revision]`, allow-listed repos only) and
`object_store.ObjectStoreSource` (`s3://`/`gs://` adapter folders directly under allowed prefixes, via fsspec).
Hub and object-store ids have their own grammars (`hf_hub.parse_hub_id`, `ObjectStoreSource.split`) and are only
recognised when the serve config enables those backends.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# A model string is only ever matched against this grammar, never used as a path or URL.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
MODEL_RE = re.compile(
    r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]{0,99})(?:@(?P<alias>[A-Za-z0-9_-]{1,64})|/(?P<version>[0-9]{1,9}))?$"
)


class RegistryUnavailable(RuntimeError):
    """The backend could not be reached (e.g. the MLflow server is down)."""


@dataclass(frozen=True)
class AdapterRef:
    id: str  # canonical and unique across backends: "mlflow:sentiment/3", "local:my-adapter:1a2b3c4d"
    name: str  # what a user calls it
    source: str  # backend name
    version: str | None = None
    base_model: str | None = None  # the base it was trained on, when the backend records it
    aliases: tuple[str, ...] = ()
    tags: dict[str, str] = field(default_factory=dict, compare=False, hash=False)


def parse_model(model: str) -> dict[str, str | None] | None:
    """Split `name`, `name@alias`, `name/version`; None if the string does not fit the grammar."""
    match = MODEL_RE.fullmatch(model)
    return match.groupdict() if match else None
