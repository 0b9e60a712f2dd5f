"""The forward pass of a Llama-family decoder (Llama, Mistral, Qwen2) over the engine's own KV cache, with the
batched-LoRA operator on all seven projections.

It reuses the Hugging Face model's modules (embeddings, RMSNorms, linear layers — plain or bitsandbytes 4-bit —,
rotary embedding, activation) so numerics match `transformers` and any loadable checkpoint works, but owns the
loop: `decode` runs one token for every row, `prefill` runs prompt chunks of several sequences in one forward; both
over the paged KV cache, through the step's attention plan (serve_app/engine/attention.py).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from adapters.batched_lora import LoraBatch
from adapters.lora_side_thread import SideWorker
from adapters.slot_bank import GROUPS, LoraSlotBank
from serve_app.engine.attention import DecodeAttention, PrefillAttention
from serve_app.engine.paged_kv import PagedKV

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


class UnsupportedModel(ValueError):
    pass


class ModelRunner:
    def __init__(self, model: Any, kv: PagedKV, bank: LoraSlotBank, side: SideWorker | None = None) -> None:
        config = model.config
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModel(
                f"model_type '{config.model_type}' is not supported by the engine ({', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        window = getattr(config, "sliding_window", None)
        if window and getattr(config, "use_sliding_window", True) and kv.max_len > window:
            raise UnsupportedModel(f"max_seq_len {kv.max_len} exceeds the model's sliding window {window}")
        self.model = model
        self.layers = model.model.layers
        self.embed = model.model.embed_tokens
        self.norm = model.model.norm
        self.lm_head = model.lm_head
        self.rotary = model.model.rotary_emb
        self.kv = kv
        self.bank = bank
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scale = self.head_dim**-0.5
        self.vocab_size = config.vocab_size
        self.side = side  # LoRA of each group starts on this thread before the base matmuls (lora_side_thread)
        self._side_rows: tuple | None = None  # this forward's rows for the side thread (None: LoRA in place)
        # per layer and projection group: (A, [B of each output]) views of the slot bank, rank, key; made once
        self._lora_views = [{g: (bank.a[g][i], [bank.b[p][i] for p in projs], bank.rank, (i, g))
                             for g, projs in GROUPS.items()} for i in range(len(self.layers))]  # fmt: skip

    # -- one decoder layer, shared by decode and prefill -----------------------------------------------------
    def _lora(self, lora: LoraBatch | None, view: tuple, x: torch.Tensor, *ys: torch.Tensor) -> None:
        """ys += the rows' LoRA deltas of one projection group (`view`: its weights) of input x, in place."""
        if lora is not None and lora.active:
            a, bs, rank, key = view
            lora.apply(x, a, list(zip(ys, bs, strict=True)), rank, key)

    def _layer(self, index: int, h: torch.Tensor, cos_sin: tuple, attend, lora: LoraBatch | None) -> torch.Tensor:
        """One decoder layer. Each projection group's LoRA either starts on the side thread before the group's
        base matmuls and is added after them (`side.start` / `side.finish`), or is applied in place after them."""
        layer = self.layers[index]
        attn, mlp = layer.self_attn, layer.mlp
        views, rows, side = self._lora_views[index], self._side_rows, self.side
        x = layer.input_layernorm(h)
        started = rows is not None and side.start(x, views["qkv"], rows)  # type: ignore[union-attr]
        q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        side.finish((q, k, v)) if started else self._lora(lora, views["qkv"], x, q, k, v)  # type: ignore[union-attr]
        n = h.shape[0]
        q = q.view(n, self.num_heads, self.head_dim).transpose(0, 1).unsqueeze(0)  # [1, H, n, d]
        k = k.view(n, self.num_kv_heads, self.head_dim).transpose(0, 1).unsqueeze(0)
        q, k = apply_rotary_pos_emb(q, k, *cos_sin)
        v = v.view(n, self.num_kv_heads, self.head_dim).transpose(0, 1).unsqueeze(0)
        out = attend(index, q, k, v)  # [n, H * d]
        started = rows is not None and side.start(out, views["o"], rows)  # type: ignore[union-attr]
        o = attn.o_proj(out)
        side.finish((o,)) if started else self._lora(lora, views["o"], out, o)  # type: ignore[union-attr]
        h = h + o
        x = layer.post_attention_layernorm(h)
        started = rows is not None and side.start(x, views["gate_up"], rows)  # type: ignore[union-attr]
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        side.finish((gate, up)) if started else self._lora(lora, views["gate_up"], x, gate, up)  # type: ignore[union-attr]
        act = mlp.act_fn(gate) * up
        started = rows is not None and side.start(act, views["down"], rows)  # type: ignore[union-attr]
        down = mlp.down_proj(act)
        side.finish((down,)) if started else self._lora(lora, views["down"], act, down)  # type: ignore[union-attr]
        return h + down

    def _rope(self, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [1, n, d] for the n tokens (decode: one per row), as HF's rotary module computes them."""
        return self.rotary(h.unsqueeze(0), positions.unsqueeze(0))

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(h)).float()

    # -- the two forwards of a step ---------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, lora: LoraBatch | None,
               attention: DecodeAttention) -> torch.Tensor:  # fmt: skip
        """One new token per row: tokens/positions [B] -> logits [B, V]. Each row's K/V is written at its slot,
        then it attends to its own live tokens (`attention`)."""
        return self._forward(tokens, positions, lora, attention, None)

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, positions: torch.Tensor, lora: LoraBatch | None,
                attention: PrefillAttention, logit_rows: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Prompt chunks of one or more sequences, concatenated: tokens/positions [T] -> logits [len(logit_rows), V]
        of the tokens `logit_rows` (None: every token). `lora` has one slot per token."""
        return self._forward(tokens, positions, lora, attention, logit_rows)

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, lora: LoraBatch | None, attention,
                 logit_rows: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        scale = self.scale

        def attend(index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return attention(index, q, k, v, scale)

        h = self.embed(tokens)
        cos_sin = self._rope(h, positions)
        count = tokens.shape[0]
        self._side_rows = lora.side_rows(count) if self.side is not None and lora is not None else None
        for index in range(len(self.layers)):
            h = self._layer(index, h, cos_sin, attend, lora)
        return self._logits(h if logit_rows is None else h.index_select(0, logit_rows))
