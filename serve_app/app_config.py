"""Configuration of the Serve application (the `args:` block of serve_app/config.yaml), validated by pydantic."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from adapters.base_models import QuantizationConfig
from serve_app.engine.config import EngineConfig

if TYPE_CHECKING:
    from adapters.registry import AdapterRegistry


class ServeAppConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_model: str = Field("smollm2-135m", description="bundled name, local folder, or HF id")
    quantization: QuantizationConfig = QuantizationConfig()
    engine: EngineConfig = EngineConfig()
    adapters_per_replica: int = Field(
        16, ge=1, description="adapters a replica keeps loaded on the host (Serve multiplexing LRU)"
    )
    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow registry to resolve adapters from; null = $MLFLOW_TRACKING_URI, '' = none"
    )
    catalog_dir: str | None = Field(None, description="local adapter catalog folder (use without MLflow)")
    hub_adapters: list[str] = Field(
        [], description="Hugging Face Hub adapter repos a request may name ('org/name' or 'org/*'); [] = none"
    )
    adapter_store_prefixes: list[str] = Field(
        [], description="object-store folders whose sub-folders are adapters (s3://bucket/lora/, gs://..., file://...)"
    )
    allow_runtime_lora_updating: bool = Field(
        False,
        description="POST /v1/load_lora_adapter and /v1/unload_lora_adapter may add and remove adapter names "
        "at run time (vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING); false: they answer 404",
    )
    registry_ttl_s: float = Field(5.0, ge=0, description="how long a name -> version lookup is cached")
    default_max_tokens: int = Field(256, ge=1)
    max_request_bytes: int = Field(1_000_000, ge=1024, description="larger request bodies get 413")
    api_key_env: str = Field("LORAFLEET_API_KEY", description="if this env var is set, requests need that Bearer key")
    request_timeout_s: float = Field(
        120.0, gt=0, description="a generation still running this long after it arrived ends with a 504 error"
    )
    apply_trained_prompt: bool = Field(
        True, description="chat requests without a system message get the adapter's trained system prompt"
    )
    template_lorax_chat: bool = Field(
        True, description="LoRAX /generate inputs to a chat-trained adapter go through the chat template"
    )

    def build_registry(self, base_model: str) -> AdapterRegistry:
        """The adapter registry this config allows: local catalog, MLflow, allow-listed Hub repos and store prefixes."""
        from adapters.registry import AdapterRegistry

        return AdapterRegistry(base_model, self.catalog_dir, self.resolved_mlflow_uri(), self.registry_ttl_s,
                               hub_allowed=self.hub_adapters, store_prefixes=self.adapter_store_prefixes)  # fmt: skip

    def resolved_mlflow_uri(self) -> str | None:
        """cluster/mlflow_uri.py's rule: this field ("" = none), $MLFLOW_TRACKING_URI, the running local stack."""
        from cluster.mlflow_uri import resolve_mlflow_uri

        return resolve_mlflow_uri(self.mlflow_tracking_uri)
