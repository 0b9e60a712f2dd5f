"""Engine configuration (pydantic, extra fields refused): memory bounds, the paged KV cache, adapter slots,
scheduling knobs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from adapters.base_models import DType

if TYPE_CHECKING:
    import torch


def resolve_device(name: str) -> torch.device:
    """`EngineConfig.device` as a torch device ('auto': cuda if available, else cpu)."""
    import torch  # (here: the config itself is read where torch is not imported)

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device: str = Field("auto", description="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1'")
    dtype: DType = Field("auto", description="weights/activations; auto = bfloat16 on CUDA, float32 on CPU")
    max_running: int = Field(16, ge=1, le=1024, description="sequences running (prefill or decode) together")
    max_seq_len: int = Field(1024, ge=16, description="prompt + generated tokens per sequence")
    kv_block_size: int = Field(16, ge=16, le=256, description="tokens per paged-KV block (a power of two)")
    num_kv_blocks: int | None = Field(
        None,
        ge=1,
        description="paged-KV blocks shared by all sequences; None = max_running x blocks of max_seq_len (never "
        "preempts). Fewer save memory: when they run out the youngest running sequence is preempted and later "
        "recomputed (same tokens)",
    )
    max_queue: int = Field(1024, ge=1, description="waiting requests beyond which new ones are refused (429)")
    max_loras: int = Field(8, ge=1, description="adapter slots on the device = distinct adapters in one step")
    max_lora_rank: int = Field(16, ge=1, le=256, description="slot rank; lower-rank adapters are zero-padded")
    prefill_chunk: int = Field(
        256,
        ge=8,
        description="most prompt tokens of one sequence prefilled in one step, so long prompts never stall decoding",
    )
    prefill_token_budget: int | None = Field(
        None,
        ge=8,
        description="prompt tokens prefilled per step across sequences, in one batched forward (several prompts, "
        "each at most prefill_chunk tokens); None = prefill_chunk",
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
    decode_attention: Literal["auto", "triton", "torch"] = Field(
        "auto",
        description="decode attention over the paged KV cache (serve_app/engine/attention.py): auto = the Triton "
        "paged-decode kernel on CUDA when triton imports, else PyTorch (gather of each row's live blocks + SDPA); "
        "triton on CPU only under TRITON_INTERPRET=1 (tests)",
    )
    lora_overlap: Literal["auto", "on", "off"] = Field(
        "auto",
        description="CPU float32 on the native kernel: each projection group's LoRA runs on a worker thread while "
        "the base matmuls run (adapters/lora_side_thread.py). auto: with at least 2 PyTorch threads, measured at "
        "start-up against LoRA in place and kept if faster, taking one of PyTorch's threads "
        "(serve_app/engine/lora_overlap.py); on: always, PyTorch's threads left as they are; off: never",
    )
    cuda_graphs: Literal["auto", "on", "off", "static_eager"] = Field(
        "auto",
        description="decode through one CUDA graph per padded batch size of a ladder (1, 2, 4, ... up to "
        "cuda_graph_max_batch; serve_app/engine/decode_graphs.py): auto = on when the device is cuda and decode "
        "attention is the Triton kernel, else off; on: requires cuda (a capture that fails logs a warning and the "
        "engine decodes eagerly); static_eager: the graphs' static-buffer decode step run without capture (tests)",
    )
    cuda_graph_max_batch: int | None = Field(
        None, ge=1, description="largest decode batch captured; larger batches decode eagerly. None = max_running"
    )

    @model_validator(mode="after")
    def _check_kv(self) -> EngineConfig:
        if self.cuda_graphs == "on" and self.device == "cpu":
            raise ValueError("cuda_graphs 'on' needs a CUDA device; device is 'cpu'")
        if self.kv_block_size & (self.kv_block_size - 1):
            raise ValueError(f"kv_block_size must be a power of two, got {self.kv_block_size}")
        need = -(-self.max_seq_len // self.kv_block_size)
        if self.num_kv_blocks is not None and self.num_kv_blocks < need:
            raise ValueError(f"num_kv_blocks ({self.num_kv_blocks}) must hold one sequence of max_seq_len "
                             f"({self.max_seq_len} tokens = {need} blocks of {self.kv_block_size})")  # fmt: skip
        return self

    @property
    def kv_blocks(self) -> int:
        """The paged KV cache's block count (`num_kv_blocks`, or enough for max_running full sequences)."""
        return self.num_kv_blocks or self.max_running * -(-self.max_seq_len // self.kv_block_size)

    @property
    def graph_max_batch(self) -> int:
        """The largest decode batch size captured (`cuda_graph_max_batch`, at most max_running)."""
        return min(self.cuda_graph_max_batch or self.max_running, self.max_running)

    @property
    def prefill_budget(self) -> int:
        return self.prefill_token_budget or self.prefill_chunk
