"""The serving engine: plain Python + PyTorch, no Ray. One base model, many LoRA adapters, one decode step for all
running sequences whatever their adapters (heterogeneous continuous batching).

    from serve_app.engine import LoraEngine, EngineConfig, SamplingParams
    engine = LoraEngine.from_base_ref("tiny-llama", EngineConfig())
    engine.register_adapter("my-adapter", "/path/to/peft/adapter")   # validated, safetensors only
    engine.add_request("r1", prompt_ids, SamplingParams(max_tokens=16), adapter_id="my-adapter")
    while engine.has_work(): outputs = engine.step()

`AsyncLoraEngine` runs the step loop on a background thread and streams tokens to asyncio callers.
"""

from serve_app.engine.config import EngineConfig
from serve_app.engine.engine import LoraEngine, RequestRejected
from serve_app.engine.sequence import SamplingParams, TokenOutput

__all__ = ["EngineConfig", "LoraEngine", "RequestRejected", "SamplingParams", "TokenOutput"]
