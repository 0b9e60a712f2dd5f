"""An MLflow pyfunc flavor for a lorafleet adapter: a registered version loads and answers with plain MLflow.

The model folder (an MLflow model: `MLmodel`, `python_model.pkl`, `artifacts/adapter/` with the PEFT files and
`lorafleet_prompt.json`) records only the base model's *name*; loading resolves that name like training did
(`adapters.base_models.load_base`: bundled names, a folder, or a Hugging Face id), checks the adapter against it
(safetensors only, every tensor's shape and rank: `adapters.lora_files.read_lora`), applies it with PEFT and asks
it the way it was trained (`serve_app.prompting`: trained system prompt for chat, trained prefix for completion).

    import mlflow
    model = mlflow.pyfunc.load_model("models:/sentiment@champion")
    model.predict(["I loved this film"])                                     # prompts -> answers
    model.predict({"messages": [{"role": "user", "content": "Great film"}]})  # one chat -> [answer]
    mlflow models serve -m models:/sentiment@champion --env-manager local -p 5001
    curl -s localhost:5001/invocations -H 'content-type: application/json' -d '{"inputs": ["I loved it"]}'

    python -m adapters.mlflow_pyfunc <adapter_dir> <out_dir> --base tiny-llama   # write a model folder by hand

Decoding is greedy; `max_new_tokens` (default 64, at most 1024) comes from the request (`max_tokens` in a
`{"messages"|"prompt": ...}` body, or `params`) or the model config. The `lorafleet` package must be importable where the
model loads (the environment that trained it; `--env-manager local`).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

import mlflow.pyfunc

ADAPTER_KEY = "adapter"  # the model folder keeps the adapter files in artifacts/<ADAPTER_KEY>/
DEFAULT_MAX_NEW_TOKENS = 64
MAX_NEW_TOKENS_LIMIT = 1024
MAX_RANK = 256


class PredictInputError(ValueError):
    """The input is not a prompt, a list of prompts, or chat messages (the message says what was received)."""


class LoraAdapterModel(mlflow.pyfunc.PythonModel):
    """Base (loaded by name) + one LoRA adapter; predict: prompts or chat messages -> generated text, one per item."""

    def load_context(self, context: Any) -> None:
        from peft import PeftModel

        from adapters.base_models import load_base
        from adapters.lora_files import BaseShapes, read_lora
        from adapters.prompt_format import read_prompt_format

        adapter_dir = Path(context.artifacts[ADAPTER_KEY])
        config = dict(context.model_config or {})
        self.max_new_tokens = int(config.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
        self.base = load_base(str(config["base_model"]))
        shapes = BaseShapes.from_config(self.base.model.config, self.base.fingerprint, self.base.name)
        read_lora(adapter_dir, shapes, MAX_RANK)  # refuses pickles, wrong shapes/targets, absurd values
        self.fmt = read_prompt_format(adapter_dir)
        self.model = PeftModel.from_pretrained(self.base.model, str(adapter_dir))
        self.model.eval()

    def predict(self, context: Any, model_input: Any, params: dict[str, Any] | None = None) -> list[str]:
        limit = _max_new_tokens(model_input, params, self.max_new_tokens)
        return [self._generate(payload, limit) for payload in requests_of(model_input)]

    def _generate(self, payload: dict[str, Any], max_new_tokens: int) -> str:
        import torch

        from serve_app.prompting import prompt_ids

        tokenizer = self.base.tokenizer
        ids = torch.tensor([prompt_ids(tokenizer, payload, self.fmt)])
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        for stop in self.fmt.stop if self.fmt else []:
            text = text.split(stop)[0] if stop else text
        return text


def _max_new_tokens(model_input: Any, params: dict[str, Any] | None, default: int) -> int:
    """A chat/completions body's own `max_tokens` first (pyfunc always fills `params` with the declared default)."""
    value = None
    if isinstance(model_input, dict):
        value = model_input.get("max_tokens", model_input.get("max_new_tokens"))
    if value is None:
        value = (params or {}).get("max_new_tokens")
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not 1 <= int(value) <= MAX_NEW_TOKENS_LIMIT:
        raise PredictInputError(f"max_new_tokens must be an integer from 1 to {MAX_NEW_TOKENS_LIMIT}, got {value!r}")
    return int(value)


def _is_message(item: Any) -> bool:
    return isinstance(item, dict) and isinstance(item.get("role"), str) and isinstance(item.get("content"), str)


def _messages(value: Any) -> list[dict[str, str]]:
    items = value.tolist() if hasattr(value, "tolist") else value
    if not isinstance(items, list) or not items or not all(_is_message(m) for m in items):
        raise PredictInputError("messages must be a non-empty list of {'role': str, 'content': str}")
    return [{"role": m["role"], "content": m["content"]} for m in items]


def _one(item: Any) -> dict[str, Any]:
    if isinstance(item, str):
        return {"kind": "text", "prompt": item}
    if isinstance(item, dict) and "messages" in item:
        return {"kind": "chat", "messages": _messages(item["messages"])}
    if isinstance(item, dict) and isinstance(item.get("prompt"), str):
        return {"kind": "text", "prompt": item["prompt"]}
    if isinstance(item, list) and item and all(_is_message(m) for m in item):
        return {"kind": "chat", "messages": _messages(item)}
    raise PredictInputError(f"expected a prompt string, a list of chat messages or {{'messages': [...]}} / "
                            f"{{'prompt': str}}; got {type(item).__name__}: {str(item)[:100]}")  # fmt: skip


def requests_of(model_input: Any) -> list[dict[str, Any]]:
    """Normalise what pyfunc hands `predict` into request payloads (`serve_app.prompting`'s `kind` chat/text):
    a string; a list of strings / conversations / dicts; one `{"messages": [...]}` or `{"prompt": ...}` (MLflow's
    chat and completions bodies); one conversation (a list of role/content dicts); a numpy array; or a DataFrame
    with a `prompt` or `messages` column (or a single column of prompts)."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        if "messages" in model_input.columns:
            return [{"kind": "chat", "messages": _messages(m)} for m in model_input["messages"]]
        column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        if column != "prompt" and len(model_input.columns) != 1:
            raise PredictInputError(f"a DataFrame needs a 'prompt' or 'messages' column, got {list(model_input)}")
        return [_one(value) for value in model_input[column]]
    if hasattr(model_input, "tolist") and not isinstance(model_input, str):
        model_input = model_input.tolist()
    if isinstance(model_input, str | dict):
        return [_one(model_input)]
    if isinstance(model_input, list) and model_input:
        if all(_is_message(m) for m in model_input):
            return [_one(model_input)]
        return [_one(item) for item in model_input]
    raise PredictInputError(f"expected prompts or chat messages, got {type(model_input).__name__} (empty or unknown)")


def pip_requirements() -> list[str]:
    """The packages the model needs, pinned to what is installed (lorafleet itself must be installed too)."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for name in ("mlflow", "torch", "transformers", "peft", "safetensors", "pydantic"):
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pins.append(name)
    return pins


def _signature(max_new_tokens: int) -> Any:
    """Params only (inputs vary: prompts or chat messages, checked by `requests_of`): pyfunc passes a request's
    `max_new_tokens` through only when the signature declares it."""
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec

    return ModelSignature(inputs=None, params=ParamSchema([ParamSpec("max_new_tokens", "long", max_new_tokens)]))


def save_pyfunc(adapter_dir: Path | str, out_dir: Path | str, base_model: str,
                max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> Path:  # fmt: skip
    """Write an MLflow model folder for the adapter at `out_dir` (replaced if present); returns it."""
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    mlflow.pyfunc.save_model(
        str(out),
        python_model=LoraAdapterModel(),
        artifacts={ADAPTER_KEY: str(adapter_dir)},
        model_config={"base_model": base_model, "max_new_tokens": max_new_tokens},
        signature=_signature(max_new_tokens),
        pip_requirements=pip_requirements(),
    )
    return out


def adapter_files_of(folder: Path) -> Path:
    """The adapter files inside a model folder written by `save_pyfunc` (its MLmodel names the artifact's path), or
    `folder` itself for a plain adapter folder. Never a path outside `folder`."""
    import yaml

    mlmodel = folder / "MLmodel"
    if not mlmodel.is_file():
        return folder
    try:
        spec = yaml.safe_load(mlmodel.read_text(encoding="utf-8"))
        relative = spec["flavors"]["python_function"]["artifacts"][ADAPTER_KEY]["path"]
    except (yaml.YAMLError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise FileNotFoundError(f"{mlmodel} names no '{ADAPTER_KEY}' artifact ({err})") from None
    inner = (folder / str(relative)).resolve()
    if not inner.is_relative_to(folder.resolve()) or not inner.is_dir():
        raise FileNotFoundError(f"{mlmodel}: artifact path {relative!r} is not a folder inside the model")
    return inner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--base", required=True, help="base model name the adapter was trained on")
    parser.add_argument("--prompt", default=None, help="also load the written model and answer this prompt")
    args = parser.parse_args()
    out = save_pyfunc(args.adapter_dir, args.out_dir, args.base)
    print(out)
    if args.prompt is not None:
        print(mlflow.pyfunc.load_model(str(out)).predict([args.prompt])[0])


if __name__ == "__main__":
    main()
