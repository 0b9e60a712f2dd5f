"""A local adapter catalog: `<root>/<name>/` holds adapter_config.json + adapter_model.safetensors.

For use without MLflow, and for registering any PEFT LoRA folder by hand:

    python -m adapters.sources.local_catalog add my-adapter /path/to/peft/folder --root .lorafleet/adapters
    python -m adapters.sources.local_catalog list --root .lorafleet/adapters

`add` copies only the two files (never a pickle) and validates the config, plus the prompt the adapter was
trained with (`lorafleet_prompt.json`, validated) when there is one. The canonical id includes a hash of the
files' size and mtime, so replacing an adapter's files makes replicas load the new version.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
from pathlib import Path

from adapters.lora_files import CONFIG_FILE, WEIGHTS_FILE, AdapterRejected, quick_check, read_config
from adapters.prompt_format import PROMPT_FILE, PromptFormatError, read_prompt_format
from adapters.sources import NAME_RE, AdapterRef, parse_model


class LocalCatalog:
    source = "local"

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def _folder(self, name: str) -> Path | None:
        if not NAME_RE.fullmatch(name):
            return None
        folder = self.root / name
        return folder if (folder / CONFIG_FILE).is_file() else None

    def _ref(self, name: str, folder: Path) -> AdapterRef:
        stamp = hashlib.sha256()
        for file in (CONFIG_FILE, WEIGHTS_FILE, PROMPT_FILE):
            path = folder / file
            st = path.stat() if path.exists() else None
            stamp.update(f"{file}:{st.st_size if st else -1}:{st.st_mtime_ns if st else -1}".encode())
        try:
            base = read_config(folder).base_model_name_or_path
        except AdapterRejected:
            base = None
        return AdapterRef(f"local:{name}:{stamp.hexdigest()[:8]}", name, self.source, None, base)

    def resolve(self, model: str) -> AdapterRef | None:
        parts = parse_model(model)
        if not parts or parts["alias"] or parts["version"]:
            return None
        folder = self._folder(parts["name"] or "")
        return self._ref(parts["name"] or "", folder) if folder else None

    def fetch(self, ref: AdapterRef) -> Path:
        folder = self._folder(ref.name)
        if folder is None:
            raise FileNotFoundError(f"adapter {ref.name} is no longer in the local catalog")
        return folder

    def list_refs(self) -> list[AdapterRef]:
        """Servable adapters only: folders with a broken config or safetensors header are left out."""
        if not self.root.is_dir():
            return []
        return [self._ref(p.name, p) for p in sorted(self.root.iterdir())
                if self._folder(p.name) and quick_check(p) is None]  # fmt: skip

    def add(self, name: str, source_folder: Path | str) -> AdapterRef:
        """Copy a PEFT LoRA folder's config + safetensors into the catalog under `name`."""
        if not NAME_RE.fullmatch(name):
            raise ValueError(f"adapter name '{name}' must match {NAME_RE.pattern}")
        src = Path(source_folder)
        read_config(src)  # refuses non-LoRA / unsupported configs early
        if not (src / WEIGHTS_FILE).is_file():
            raise AdapterRejected(f"{src} has no {WEIGHTS_FILE} (only safetensors adapters are accepted)")
        try:
            prompt = read_prompt_format(src)
        except PromptFormatError as err:
            raise AdapterRejected(f"{src}: {err}") from None
        dest = self.root / name
        dest.mkdir(parents=True, exist_ok=True)
        for file in (CONFIG_FILE, WEIGHTS_FILE):
            shutil.copy2(src / file, dest / file)
        (dest / PROMPT_FILE).unlink(missing_ok=True)
        if prompt is not None:
            prompt.write(dest)
        return self._ref(name, dest)


def main() -> None:
    parser = argparse.ArgumentParser(description="Manage a local adapter catalog.")
    parser.add_argument("--root", default=".lorafleet/adapters")
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add")
    add.add_argument("name")
    add.add_argument("folder")
    sub.add_parser("list")
    args = parser.parse_args()
    catalog = LocalCatalog(args.root)
    if args.command == "add":
        print(catalog.add(args.name, args.folder).id)
    else:
        for ref in catalog.list_refs():
            print(ref.name, ref.id)


if __name__ == "__main__":
    main()
