"""Configuration of the Serve application (the `args:` block of serve_app/config.yaml), validated by pydantic."""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict, Field

from adapters.base_models import QuantizationConfig
from serve_app.engine.config import EngineConfig


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
    registry_ttl_s: float = Field(5.0, ge=0, description="how long a name -> version lookup is cached")
    default_max_tokens: int = Field(256, ge=1)
    max_request_bytes: int = Field(1_000_000, ge=1024, description="larger request bodies get 413")
    api_key_env: str = Field("LORAFLEET_API_KEY", description="if this env var is set, requests need that Bearer key")

    def resolved_mlflow_uri(self) -> str | None:
        if self.mlflow_tracking_uri is None:
            return os.environ.get("MLFLOW_TRACKING_URI") or None
        return self.mlflow_tracking_uri or None
