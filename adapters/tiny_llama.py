"""A tiny random Llama-architecture model and byte-level tokenizer, built deterministically, for fast tests.

Same code paths as a real Llama (GQA attention, RoPE, SwiGLU, RMSNorm, a ChatML chat template) at a size that runs
in milliseconds on a CPU. The tokenizer maps every byte to one token plus three special tokens, so any text
round-trips. Weights come from a fixed seed with a wide init, so greedy decoding has clear argmax margins.

    python -m adapters.tiny_llama       # build (if needed) and print the folder
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from adapters.cache import build_once, cache_root

TINY_LLAMA_NAME = "tiny-llama"

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

TINY_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "initializer_range": 0.25,
    "tie_word_embeddings": False,
    "seed": 0,
}


def build_byte_tokenizer():
    """A byte-level tokenizer: 256 byte tokens then the special tokens; ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def _build(out: Path, spec: dict[str, Any]) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_byte_tokenizer()
    params = {k: v for k, v in spec.items() if k not in ("seed", "rope_theta")}
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": spec["rope_theta"]},
        **params,
    )
    config._name_or_path = TINY_LLAMA_NAME
    torch.manual_seed(spec["seed"])
    model = LlamaForCausalLM(config).float()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def tiny_llama_dir(**overrides: Any) -> Path:
    """Folder of the tiny model; `overrides` change TINY_CONFIG fields (a different folder per distinct config)."""
    unknown = set(overrides) - set(TINY_CONFIG)
    if unknown:
        raise ValueError(f"unknown tiny-llama config fields: {sorted(unknown)}")
    spec = {**TINY_CONFIG, **overrides}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    return build_once(cache_root() / "models" / f"{TINY_LLAMA_NAME}-{digest}", lambda tmp: _build(tmp, spec))


if __name__ == "__main__":
    print(tiny_llama_dir())
