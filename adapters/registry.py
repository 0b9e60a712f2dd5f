"""The adapter registry: resolve a request's `model` string to one adapter, across storage backends.

Order: the local catalog first (an explicit, hand-made catalog wins), then the MLflow registry, then Hugging Face
Hub repos (`org/name[@revision]`, only those the serve config allows: `hub_allowed`), then object storage
(`s3://...`/`gs://...` adapter folders directly under a prefix the serve config allows: `store_prefixes`). A model string is matched
against a strict grammar and never used as a path or URL. Adapters trained on another base are refused.

    python -m adapters.registry sentiment --mlflow http://127.0.0.1:5000 --base smollm2-135m
"""

from __future__ import annotations

import argparse
from pathlib import Path

from adapters.sources import AdapterRef, parse_model
from adapters.sources.hf_hub import HubSource, parse_hub_id
from adapters.sources.local_catalog import LocalCatalog
from adapters.sources.mlflow_registry import MlflowRegistry
from adapters.sources.object_store import ObjectStoreSource


class UnknownAdapter(LookupError):
    """No backend knows this model string (an HTTP 404)."""


class IncompatibleAdapter(ValueError):
    """The adapter exists but was trained for another base model."""


class AdapterRegistry:
    def __init__(
        self,
        base_model: str,
        catalog_dir: Path | str | None = None,
        mlflow_uri: str | None = None,
        ttl_s: float = 5.0,
        hub_allowed: list[str] | None = None,
        hub_cache_dir: Path | str | None = None,
        store_prefixes: list[str] | None = None,
    ) -> None:
        self.base_model = base_model
        self.sources: list[LocalCatalog | MlflowRegistry | HubSource | ObjectStoreSource] = []
        if catalog_dir:
            self.sources.append(LocalCatalog(catalog_dir))
        if mlflow_uri:
            self.sources.append(MlflowRegistry(mlflow_uri, ttl_s))
        if hub_allowed:
            self.sources.append(HubSource(hub_allowed, hub_cache_dir))
        if store_prefixes:
            self.sources.append(ObjectStoreSource(store_prefixes))

    def resolve(self, model: str) -> AdapterRef:
        """Raises UnknownAdapter, IncompatibleAdapter, or sources.RegistryUnavailable."""
        hub = any(isinstance(s, HubSource) for s in self.sources) and parse_hub_id(model) is not None
        store = any(isinstance(s, ObjectStoreSource) and s.split(model) for s in self.sources)
        if parse_model(model) is None and not hub and not store:
            raise UnknownAdapter(f"'{model[:100]}' is not a valid model id (expected name, name@alias or name/N)")
        for source in self.sources:
            ref = source.resolve(model)
            if ref is not None:
                self._check_base(ref)
                return ref
        raise UnknownAdapter(f"the model '{model}' does not exist")

    def _check_base(self, ref: AdapterRef) -> None:
        if ref.base_model and ref.base_model != self.base_model and ref.source == "mlflow":
            raise IncompatibleAdapter(
                f"adapter {ref.name} (version {ref.version}) was trained on {ref.base_model}; "
                f"this endpoint serves {self.base_model}"
            )

    def ref_for_id(self, adapter_id: str) -> AdapterRef:
        """A canonical id (as routed to a replica) back to its ref."""
        kind, _, rest = adapter_id.partition(":")
        for source in self.sources:
            if source.source != kind:
                continue
            ref = (
                source.ref_for_id(adapter_id)
                if isinstance(source, MlflowRegistry | HubSource | ObjectStoreSource)
                else source.resolve(rest.split(":")[0])
            )
            if ref is not None and ref.id == adapter_id:
                return ref
        raise UnknownAdapter(f"adapter {adapter_id} is no longer registered")

    def fetch(self, ref: AdapterRef) -> Path:
        """A local folder with the adapter's files; UnknownAdapter if it was removed since it was resolved."""
        source = next((s for s in self.sources if s.source == ref.source), None)
        try:
            if source is None:
                raise FileNotFoundError(ref.source)
            return source.fetch(ref)
        except FileNotFoundError:
            raise UnknownAdapter(f"adapter {ref.id} is no longer registered") from None

    def list_refs(self) -> list[AdapterRef]:
        refs: list[AdapterRef] = []
        for source in self.sources:
            refs.extend(r for r in source.list_refs() if not r.base_model or source.source != "mlflow"
                        or r.base_model == self.base_model)  # fmt: skip
        return refs


def main() -> None:
    parser = argparse.ArgumentParser(description="Resolve a model string to an adapter.")
    parser.add_argument("model")
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--catalog", default=".lorafleet/adapters")
    parser.add_argument("--mlflow", default=None)
    args = parser.parse_args()
    registry = AdapterRegistry(args.base, args.catalog, args.mlflow)
    ref = registry.resolve(args.model)
    print(ref.id, registry.fetch(ref))


if __name__ == "__main__":
    main()
