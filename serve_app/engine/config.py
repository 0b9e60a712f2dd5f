"""Engine configuration (pydantic, extra fields refused): memory bounds, adapter slots, scheduling knobs."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from adapters.base_models import DType


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device: str = Field("auto", description="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1'")
    dtype: DType = Field("auto", description="weights/activations; auto = bfloat16 on CUDA, float32 on CPU")
    max_running: int = Field(16, ge=1, le=1024, description="sequences decoding together (KV slots)")
    max_seq_len: int = Field(1024, ge=16, description="prompt + generated tokens per sequence (KV per slot)")
    max_queue: int = Field(1024, ge=1, description="waiting requests beyond which new ones are refused (429)")
    max_loras: int = Field(8, ge=1, description="adapter slots on the device = distinct adapters in one step")
    max_lora_rank: int = Field(16, ge=1, le=256, description="slot rank; lower-rank adapters are zero-padded")
    prefill_chunk: int = Field(
        256,
        ge=8,
        description="prompt tokens prefilled per step (across sequences), so long prompts never stall decoding",
    )
    starvation_s: float = Field(
        2.0, ge=0, description="an adapter waiting longer than this for a slot stops new admissions of running ones"
    )
    lora_kernel: Literal["auto", "native", "gather", "grouped", "triton"] = Field(
        "auto",
        description="mixed-adapter LoRA path (adapters/batched_lora.py): auto = the Triton SGMV/BGMV kernels for "
        "mixed batches on CUDA when triton imports, the native C kernel on CPU float32 when it builds, else "
        "gather/grouped by size; native requires the C kernel; triton requires CUDA and the triton extra (on CPU: "
        "only under TRITON_INTERPRET=1, for tests)",
    )
    lora_overlap: Literal["auto", "on", "off"] = Field(
        "auto",
        description="CPU float32 on the native kernel: each projection group's LoRA runs on a worker thread while "
        "the base matmuls run (adapters/lora_side_thread.py). auto: with at least 2 PyTorch threads, measured at "
        "start-up against LoRA in place and kept if faster, taking one of PyTorch's threads "
        "(serve_app/engine/lora_overlap.py); on: always, PyTorch's threads left as they are; off: never",
    )
