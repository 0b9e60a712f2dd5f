"""How a Hugging Face Llama maps onto llama.cpp's GGUF `llama` architecture: tensor names, the q/k row order,
tensor types per quantization, hyperparameters and the tokenizer. Shared by the `gguf` and `gguf-lora` writers.

Learned from llama.cpp's convert_hf_to_gguf.py (not copied): llama.cpp's RoPE pairs dimension i with i + d/2
inside each head the way the original Llama checkpoints did, so Hugging Face's q_proj / k_proj rows are permuted
back (`permute_qk`); a LoRA's B matrix gets the same row permutation. Norm weights stay float32.

    python -m adapters.export.gguf_llama tiny-llama     # print the tensor-name map and tokenizer summary
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from adapters.export.prepare import ExportRefused

# HF suffix inside a layer -> GGUF name inside `blk.N.`
LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
PROJECTION_NAMES = {k.split(".")[1]: v for k, v in LAYER_NAMES.items() if "." in k}
GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}  # fmt: skip
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")
# Known llama.cpp pre-tokenizer names, by base. A byte-level BPE without merges tokenizes the same under any.
PRE_TOKENIZERS = {"smollm2-135m": "smollm"}
QUANTS = ("f32", "f16", "q8_0", "q4_0")


def gguf_name(hf_key: str) -> str:
    if hf_key in GLOBAL_NAMES:
        return GLOBAL_NAMES[hf_key]
    match = _LAYER_KEY.match(hf_key)
    if not match or match[2] not in LAYER_NAMES:
        raise ExportRefused(f"base tensor '{hf_key}' has no place in llama.cpp's llama architecture")
    return f"blk.{match[1]}.{LAYER_NAMES[match[2]]}.weight"


def permute_qk(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder the output rows of q_proj (n_head = attention heads) or k_proj (n_head = kv heads) per head:
    HF's rotate-half layout -> llama.cpp's interleaved pairs. Works on any [out, ...] array (weights, LoRA B)."""
    shape = rows.shape
    return rows.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def permute_for(hf_key: str, array: np.ndarray, config: Any) -> np.ndarray:
    if ".q_proj." in hf_key or hf_key.endswith(".q_proj"):
        return permute_qk(array, config.num_attention_heads)
    if ".k_proj." in hf_key or hf_key.endswith(".k_proj"):
        return permute_qk(array, config.num_key_value_heads)
    return array


def tensor_type(gguf_key: str, array: np.ndarray, quant: str) -> Any:
    """The GGML type a tensor is stored in for `quant`. 1-D tensors (norms) stay F32; for q4_0 the token embedding
    (also the output layer when tied) is kept at Q8_0, as llama.cpp's own quantizer keeps it above 4 bits."""
    from gguf import GGMLQuantizationType as T

    if array.ndim == 1 or quant == "f32":
        return T.F32
    chosen = {"f16": T.F16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}[quant]
    if quant == "q4_0" and gguf_key in ("token_embd.weight", "output.weight"):
        chosen = T.Q8_0
    if chosen in (T.Q8_0, T.Q4_0) and array.shape[-1] % 32:
        raise ExportRefused(f"{gguf_key}: row size {array.shape[-1]} is not a multiple of 32, {quant} needs that")
    return chosen


def encode(array: np.ndarray, qtype: Any) -> np.ndarray:
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    if qtype == T.F32:
        return np.ascontiguousarray(array, dtype=np.float32)
    if qtype == T.F16:
        return np.ascontiguousarray(array, dtype=np.float16)
    return quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype)


def add_hparams(writer: Any, config: Any, context_length: int | None = None) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    writer.add_context_length(context_length or config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(theta or getattr(config, "rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)


def pre_tokenizer(base_name: str, merges: list[str]) -> str:
    if base_name in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[base_name]
    if not merges:
        return "default"
    raise ExportRefused(
        f"llama.cpp needs the pre-tokenizer of base '{base_name}' and the writer does not know it "
        f"(known: {', '.join(PRE_TOKENIZERS)}, or any byte-level BPE without merges)"
    )


def add_tokenizer(writer: Any, base_dir: Path, base_name: str, tokenizer: Any, vocab_size: int) -> None:
    """Tokens, token types, merges, special ids and the chat template, from the base's tokenizer.json."""
    from gguf import TokenType

    path = base_dir / "tokenizer.json"
    if not path.is_file():
        raise ExportRefused(f"base {base_name} has no tokenizer.json (a fast BPE tokenizer is needed for GGUF)")
    spec = json.loads(path.read_text())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise ExportRefused(f"base {base_name} tokenizer is {model.get('type')}; the GGUF writer supports BPE")
    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    special = {}
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        special[added["id"]] = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
    if max(by_id) >= vocab_size:
        raise ExportRefused(f"tokenizer has token id {max(by_id)} beyond the model's vocab_size {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(special.get(i, TokenType.NORMAL))
        else:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer(base_name, merges))
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    writer.add_token_merges(merges or _inert_merge(tokens, types))
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):  # fmt: skip
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is not None:
            add(int(token_id))
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def _inert_merge(tokens: list[str], types: list[Any]) -> list[str]:
    """llama.cpp's gpt2 vocab needs at least one merge, and GGUF has no empty arrays. A byte-level tokenizer
    without merges (the tiny test model's) gets one merge of two control tokens: control tokens are split off
    before BPE runs, so the merge never applies and tokenization stays one token per byte."""
    from gguf import TokenType

    control = [t for t, kind in zip(tokens, types, strict=True) if kind == TokenType.CONTROL]
    if not control:
        raise ExportRefused("a BPE tokenizer without merges or control tokens cannot be written for llama.cpp")
    return [f"{control[0]} {control[0]}"]


def main() -> None:
    from adapters.base_models import resolve_base

    parser = argparse.ArgumentParser(description="Show how a base's tensors map to GGUF names.")
    parser.add_argument("base", nargs="?", default="tiny-llama")
    args = parser.parse_args()
    from safetensors import safe_open

    resolved = resolve_base(args.base)
    with safe_open(str(Path(resolved.path) / "model.safetensors"), framework="np") as handle:
        for key in sorted(handle.keys()):
            print(f"{key:50s} -> {gguf_name(key)}")


if __name__ == "__main__":
    main()
