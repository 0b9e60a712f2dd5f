"""Adapters in object storage through fsspec: `s3://bucket/adapters/<name>`, `gs://...`, enabled only under the
prefixes a serve config allows (`ObjectStoreSource(["s3://bucket/adapters/"])`). A request may name one adapter
folder directly under an allowed prefix (`<prefix><name>`, `name` as in adapters/sources/__init__.py's NAME_RE);
nothing else, so a client can never make the server read another bucket, path or URL.

Only the adapter's files are copied (`adapter_config.json`, `adapter_model.safetensors`, `lorafleet_prompt.json`
when present; never a pickle), once per content (the id carries the weights' size and ETag/mtime) into the lorafleet
cache; the weights must stay under `max_bytes`; config and safetensors header are checked (`lora_files.quick_check`).
Credentials and endpoints come from fsspec's usual places (AWS_* / GOOGLE_* environment, `storage_options`);
an S3-compatible store through `AWS_ENDPOINT_URL` (tested against a real moto S3 server: tests/test_s3_store.py).

    python -m adapters.sources.object_store s3://bucket/adapters/sentiment --allow s3://bucket/adapters/
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path
from typing import Any

from adapters.cache import build_once, cache_root
from adapters.lora_files import CONFIG_FILE, WEIGHTS_FILE, AdapterRejected, quick_check
from adapters.prompt_format import PROMPT_FILE
from adapters.sources import NAME_RE, AdapterRef, RegistryUnavailable

SCHEMES = ("s3://", "gs://", "gcs://", "file://")  # file://: a mounted share (and the tests' stand-in for a bucket)
DEFAULT_MAX_BYTES = 2 * 1024**3


class ObjectStoreSource:
    source = "store"

    def __init__(self, allowed_prefixes: list[str], max_bytes: int = DEFAULT_MAX_BYTES,
                 storage_options: dict[str, Any] | None = None) -> None:  # fmt: skip
        for prefix in allowed_prefixes:
            if not prefix.startswith(SCHEMES) or not prefix.endswith("/") or ".." in prefix:
                raise ValueError(f"adapter store prefix '{prefix}' must start with one of {SCHEMES} and end with '/'")
        self.prefixes = list(allowed_prefixes)
        self.max_bytes = max_bytes
        self.storage_options = storage_options or {}

    def split(self, model: str) -> tuple[str, str] | None:
        """(prefix, adapter name) when `model` is exactly `<allowed prefix><name>[/]`."""
        for prefix in self.prefixes:
            if model.startswith(prefix):
                name = model[len(prefix) :].removesuffix("/")
                if NAME_RE.fullmatch(name) and ".." not in name:
                    return prefix, name
        return None

    def _fs(self, url: str) -> tuple[Any, str]:
        import fsspec

        return fsspec.core.url_to_fs(url, **self.storage_options)

    def resolve(self, model: str) -> AdapterRef | None:
        split = self.split(model)
        if split is None:
            return None
        url = split[0] + split[1]
        fs, path = self._fs(url)
        try:
            info = fs.info(f"{path}/{WEIGHTS_FILE}")
        except FileNotFoundError:
            return None
        except OSError as err:
            raise RegistryUnavailable(f"adapter store {split[0]}: {err}") from err
        stamp = f"{info.get('size')}:{info.get('ETag') or info.get('etag') or info.get('mtime') or info.get('md5Hash')}"
        version = hashlib.sha256(stamp.encode()).hexdigest()[:8]
        return AdapterRef(f"store:{url}:{version}", url, self.source, version, tags={"size": str(info.get("size"))})

    def ref_for_id(self, adapter_id: str) -> AdapterRef | None:
        if not adapter_id.startswith("store:"):
            return None
        return self.resolve(adapter_id.removeprefix("store:").rsplit(":", 1)[0])

    def fetch(self, ref: AdapterRef) -> Path:
        split = self.split(ref.name)
        if split is None:
            raise FileNotFoundError(f"adapter {ref.name} is not under an allowed store prefix")
        if int(ref.tags.get("size") or 0) > self.max_bytes:
            raise AdapterRejected(f"{ref.name}: {WEIGHTS_FILE} is {ref.tags['size']} bytes (limit {self.max_bytes})")
        fs, path = self._fs(ref.name)
        key = hashlib.sha256(ref.id.encode()).hexdigest()[:16]
        target = cache_root() / "adapters" / "store" / f"{split[1]}-{key}"

        def download(tmp: Path) -> None:
            for file in (CONFIG_FILE, WEIGHTS_FILE, PROMPT_FILE):
                remote = f"{path}/{file}"
                if file == PROMPT_FILE and not fs.exists(remote):
                    continue
                if fs.size(remote) > self.max_bytes:
                    raise AdapterRejected(f"{ref.name}: {file} is larger than {self.max_bytes} bytes")
                fs.get_file(remote, str(tmp / file))

        try:
            folder = build_once(target, download)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"adapter {ref.name}: {err}") from None
        reason = quick_check(folder)
        if reason is not None:
            raise AdapterRejected(f"{ref.name}: {reason}")
        return folder

    def list_refs(self) -> list[AdapterRef]:
        refs = []
        for prefix in self.prefixes:
            fs, path = self._fs(prefix)
            try:
                names = sorted(Path(p.rstrip("/")).name for p in fs.ls(path, detail=False))
            except FileNotFoundError:
                continue
            refs.extend(r for n in names if NAME_RE.fullmatch(n) and (r := self.resolve(prefix + n)) is not None)
        return refs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--allow", action="append", required=True, help="allowed prefix ending in / (repeatable)")
    args = parser.parse_args()
    source = ObjectStoreSource(args.allow)
    ref = source.resolve(args.model)
    if ref is None:
        raise SystemExit(f"error: '{args.model}' is not an adapter folder directly under an allowed prefix")
    print(ref.id, source.fetch(ref))


if __name__ == "__main__":
    main()
