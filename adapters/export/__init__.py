"""Take an adapter off the cluster: export it as PEFT files, a merged Hugging Face folder, a llama.cpp LoRA GGUF,
or a merged (optionally 4-bit) GGUF with an Ollama Modelfile. One module per format, shared checks in `prepare`.

    lorafleet export sentiment --format gguf --quant q4_0 --out exports/sentiment-q4
    python -m adapters.export.run sentiment --format gguf-lora --out exports/sentiment-lora   # the same, no typer
"""

from adapters.export.prepare import ExportRefused
from adapters.export.run import FORMATS, ExportResult, export

__all__ = ["FORMATS", "ExportRefused", "ExportResult", "export"]
