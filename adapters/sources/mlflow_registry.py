"""Adapters in the MLflow Model Registry: one registered model per task, one version per trained adapter.

`name` means the version under alias `champion`; `name@alias` any alias; `name/3` a version number. A version's
`source` is an MLflow pyfunc model folder (adapters/mlflow_pyfunc.py) holding the PEFT files under its
`artifacts/`, or (versions registered before) the plain adapter folder; `fetch` downloads it once into the lorafleet
cache and returns the folder with the adapter files.
Lookups are cached for `ttl_s` seconds, so new registrations are servable within that time without a restart.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from adapters.cache import build_once, cache_root
from adapters.sources import AdapterRef, RegistryUnavailable, parse_model

CHAMPION = "champion"
BASE_TAG = "base_model"
MAX_CACHED = 1024  # lookups kept (hits and misses): a flood of distinct unknown names must not grow memory


class MlflowRegistry:
    source = "mlflow"

    def __init__(self, tracking_uri: str, ttl_s: float = 5.0) -> None:
        self.tracking_uri = tracking_uri
        self.ttl_s = ttl_s
        self._cache: OrderedDict[str, tuple[float, AdapterRef | None]] = OrderedDict()
        self._lock = threading.Lock()
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        return self._client

    def _lookup(self, name: str, alias: str | None, version: str | None) -> AdapterRef | None:
        from mlflow.exceptions import MlflowException

        try:
            if version:
                mv = self.client.get_model_version(name, version)
            else:
                mv = self.client.get_model_version_by_alias(name, alias or CHAMPION)
        except MlflowException as err:
            code = getattr(err, "error_code", "")
            if code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
                return None
            raise RegistryUnavailable(f"MLflow registry at {self.tracking_uri}: {err.message}") from err
        except OSError as err:
            raise RegistryUnavailable(f"MLflow registry at {self.tracking_uri} is unreachable: {err}") from err
        tags = dict(mv.tags or {})
        return AdapterRef(f"mlflow:{name}/{mv.version}", name, self.source, str(mv.version), tags.get(BASE_TAG),
                          tuple(getattr(mv, "aliases", ()) or ()), tags)  # fmt: skip

    def resolve(self, model: str) -> AdapterRef | None:
        parts = parse_model(model)
        if not parts:
            return None
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(model)
        if hit and hit[0] > now:
            return hit[1]
        ref = self._lookup(parts["name"] or "", parts["alias"], parts["version"])
        with self._lock:
            self._cache[model] = (now + self.ttl_s, ref)
            self._cache.move_to_end(model)
            while len(self._cache) > MAX_CACHED:
                self._cache.popitem(last=False)
        return ref

    def ref_for_id(self, adapter_id: str) -> AdapterRef | None:
        """Canonical id `mlflow:name/3` back to its ref."""
        if not adapter_id.startswith("mlflow:"):
            return None
        return self.resolve(adapter_id.removeprefix("mlflow:"))

    def fetch(self, ref: AdapterRef) -> Path:
        import mlflow

        from adapters.mlflow_pyfunc import adapter_files_of

        mv = self.client.get_model_version(ref.name, ref.version)
        target = cache_root() / "adapters" / "mlflow" / _safe(self.tracking_uri) / ref.name / str(ref.version)

        def download(tmp: Path) -> None:
            mlflow.artifacts.download_artifacts(
                artifact_uri=mv.source, dst_path=str(tmp), tracking_uri=self.tracking_uri
            )

        folder = build_once(target, download)
        inner = [p for p in folder.iterdir() if p.is_dir()]
        # download_artifacts puts a folder artifact inside dst_path under its own name
        if len(inner) == 1 and not any(p.is_file() for p in folder.iterdir()):
            folder = inner[0]
        return adapter_files_of(folder)  # a pyfunc model folder keeps the adapter files under artifacts/

    def list_refs(self) -> list[AdapterRef]:
        from mlflow.exceptions import MlflowException

        refs: list[AdapterRef] = []
        try:
            for model in self.client.search_registered_models(max_results=1000):
                # search_model_versions leaves `aliases` empty; the registered model holds {alias: version}
                by_version: dict[str, set[str]] = {}
                for alias, number in (getattr(model, "aliases", None) or {}).items():
                    by_version.setdefault(str(number), set()).add(alias)
                for version in self.client.search_model_versions(f"name='{model.name}'", max_results=1000):
                    tags = dict(version.tags or {})
                    aliases = tuple(sorted(set(version.aliases or ()) | by_version.get(str(version.version), set())))
                    refs.append(AdapterRef(f"mlflow:{model.name}/{version.version}", model.name, self.source,
                                           str(version.version), tags.get(BASE_TAG), aliases, tags))  # fmt: skip
        except (MlflowException, OSError) as err:
            raise RegistryUnavailable(f"MLflow registry at {self.tracking_uri}: {err}") from err
        return refs


def _safe(uri: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in uri)[:80]
