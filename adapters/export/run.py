"""`lorafleet export`: resolve MODEL the way the serving endpoint does (local catalog, then the MLflow registry:
`task`, `task@alias`, `task/N`, a catalog entry), fetch the adapter, validate it against the base, write the asked
format into a new folder, and optionally log that folder back to the version's MLflow run.

    python -m adapters.export.run sentiment --format gguf --quant q4_0 --out exports/sentiment-q4 \
        --mlflow http://127.0.0.1:5000 --log-to-mlflow
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path

from adapters.export.gguf_lora import LORA_QUANTS
from adapters.export.gguf_model import GGUF_QUANTS
from adapters.export.prepare import ExportRefused, load_source
from adapters.registry import AdapterRegistry, IncompatibleAdapter, UnknownAdapter
from adapters.sources import RegistryUnavailable

log = logging.getLogger(__name__)

FORMATS = ("peft", "merged", "gguf-lora", "gguf")
DEFAULT_QUANT = {"gguf": "f16", "gguf-lora": "f16"}
QUANT_CHOICES = {"gguf": GGUF_QUANTS, "gguf-lora": LORA_QUANTS}


@dataclass
class ExportResult:
    adapter_id: str
    files: list[Path]
    mlflow_uri: str | None = None
    notes: list[str] = field(default_factory=list)


def export(model: str | None, fmt: str, out: Path, *, quant: str | None = None, base: str = "smollm2-135m",
           catalog_dir: Path | str | None = None, mlflow_uri: str | None = None,
           log_to_mlflow: bool = False) -> ExportResult:  # fmt: skip
    """Export one adapter (`model=None`: the base alone, format gguf only); ExportRefused with the reason."""
    if fmt not in FORMATS:
        raise ExportRefused(f"format '{fmt}' is not one of {', '.join(FORMATS)}")
    if quant and fmt not in DEFAULT_QUANT:
        raise ExportRefused(f"--quant applies to gguf and gguf-lora, not to {fmt}")
    if log_to_mlflow and not mlflow_uri:
        raise ExportRefused("--log-to-mlflow needs an MLflow tracking URI (--mlflow or $MLFLOW_TRACKING_URI)")
    if quant and quant not in QUANT_CHOICES[fmt]:
        raise ExportRefused(f"--quant {quant} is not supported for {fmt} (supported: {', '.join(QUANT_CHOICES[fmt])})")
    quant = quant or DEFAULT_QUANT.get(fmt)
    if model is None:
        if fmt != "gguf" or log_to_mlflow:
            raise ExportRefused("without MODEL only the base is exported, as --format gguf (no --log-to-mlflow)")
        from adapters.export.gguf_model import export_gguf
        from adapters.export.prepare import base_source

        source = base_source(base)
        return ExportResult(
            f"base:{source.base.name}", export_gguf(source, Path(out), quant or "f16", source.base.name)
        )
    registry = AdapterRegistry(base, catalog_dir, mlflow_uri, ttl_s=0.0)
    try:
        ref = registry.resolve(model)
        folder = registry.fetch(ref)
    except (UnknownAdapter, IncompatibleAdapter, RegistryUnavailable) as err:
        raise ExportRefused(str(err)) from err
    if log_to_mlflow and (ref.source != "mlflow" or not ref.version):  # refuse before writing anything
        raise ExportRefused(f"--log-to-mlflow needs an adapter from the MLflow registry; {ref.id} is {ref.source}")
    source = load_source(folder, base)
    name = ref.name if ref.version is None else f"{ref.name}-v{ref.version}"
    out = Path(out)
    if fmt == "peft":
        from adapters.export.peft import export_peft

        files = export_peft(source, out)
    elif fmt == "merged":
        from adapters.export.merged import export_merged

        files = export_merged(source, out)
    elif fmt == "gguf-lora":
        from adapters.export.gguf_lora import export_gguf_lora

        files = export_gguf_lora(source, out, quant or "f16", name)
    else:
        from adapters.export.gguf_model import export_gguf

        files = export_gguf(source, out, quant or "f16", name)
    result = ExportResult(ref.id, files)
    if source.prompt is None and fmt in ("gguf", "peft"):
        result.notes.append("the adapter has no lorafleet_prompt.json: its trained system prompt is not exported")
    if log_to_mlflow and mlflow_uri:
        from adapters.export.mlflow_log import log_export

        kind = fmt if quant is None else f"{fmt}-{quant}"
        result.mlflow_uri = log_export(mlflow_uri, ref, out, kind)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=None, help="omit to export the base alone (--format gguf)")
    parser.add_argument("--format", choices=FORMATS, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quant", default=None)
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--catalog", default=".lorafleet/adapters")
    parser.add_argument("--mlflow", default=None)
    parser.add_argument("--log-to-mlflow", action="store_true")
    args = parser.parse_args()
    try:
        result = export(args.model, args.format, args.out, quant=args.quant, base=args.base, catalog_dir=args.catalog,
                        mlflow_uri=args.mlflow, log_to_mlflow=args.log_to_mlflow)  # fmt: skip
    except ExportRefused as err:
        raise SystemExit(f"refused: {err}") from None
    for path in result.files:
        print(path)


if __name__ == "__main__":
    main()
