"""Adapters on the Hugging Face Hub: `org/name` (optionally `org/name@revision`), enabled only for the repos a
serve config allows (`HubSource(allowed=["my-org/*", "other/one-adapter"])`): a request can name an allowed repo,
never make the server fetch an arbitrary one.

Only the adapter's three files are fetched (`adapter_config.json`, `adapter_model.safetensors`,
`lorafleet_prompt.json` when present; never a pickle) into the Hugging Face cache (`$HF_HOME` / `cache_dir`), with
`huggingface_hub.snapshot_download`, which honours `HF_HUB_OFFLINE=1` (then only the local cache is read). The
weights file must stay under `max_bytes`; config and safetensors header are checked (`lora_files.quick_check`);
rank, targets and shapes are checked against the base when a replica loads it (`lora_files.read_lora`).

    python -m adapters.sources.hf_hub my-org/sentiment-lora --allow 'my-org/*'   # prints the local folder
"""

from __future__ import annotations

import argparse
import fnmatch
import re
from pathlib import Path

from adapters.lora_files import CONFIG_FILE, WEIGHTS_FILE, AdapterRejected, quick_check
from adapters.prompt_format import PROMPT_FILE
from adapters.sources import AdapterRef, RegistryUnavailable

# org/name[@revision]: the Hub's own id characters; no "..", no third path part, so never a path or URL.
HUB_RE = re.compile(
    r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9_-]{0,95}(?:\.[A-Za-z0-9_-]+)*/[A-Za-z0-9][A-Za-z0-9_-]{0,95}(?:\.[A-Za-z0-9_-]+)*)"
    r"(?:@(?P<revision>[A-Za-z0-9][A-Za-z0-9._-]{0,63}))?$"
)
ALLOW_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/(\*|[A-Za-z0-9][A-Za-z0-9._-]*)$")
DEFAULT_MAX_BYTES = 2 * 1024**3


def parse_hub_id(model: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) for `org/name[@revision]`; None for anything else (names with "..", paths)."""
    match = HUB_RE.fullmatch(model)
    if match is None or ".." in model:
        return None
    return match["repo"], match["revision"]


class HubSource:
    source = "hub"

    def __init__(self, allowed: list[str], cache_dir: Path | str | None = None,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:  # fmt: skip
        for pattern in allowed:
            if not ALLOW_RE.fullmatch(pattern):
                raise ValueError(f"hub allow-list entry '{pattern}' must be 'org/name' or 'org/*'")
        self.allowed = list(allowed)
        self.cache_dir = str(cache_dir) if cache_dir else None
        self.max_bytes = max_bytes

    def _allowed(self, repo: str) -> bool:
        return any(fnmatch.fnmatchcase(repo, pattern) for pattern in self.allowed)

    def resolve(self, model: str) -> AdapterRef | None:
        parsed = parse_hub_id(model)
        if parsed is None or not self._allowed(parsed[0]):
            return None
        repo, revision = parsed
        ref_id = f"hub:{repo}@{revision or 'main'}"
        return AdapterRef(ref_id, model, self.source, revision or "main")

    def ref_for_id(self, adapter_id: str) -> AdapterRef | None:
        if not adapter_id.startswith("hub:"):
            return None
        return self.resolve(adapter_id.removeprefix("hub:").removesuffix("@main"))

    def fetch(self, ref: AdapterRef) -> Path:
        """The local snapshot folder with the adapter's files (downloaded once; offline: the cache only)."""
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

        parsed = parse_hub_id(ref.name)
        if parsed is None or not self._allowed(parsed[0]):
            raise FileNotFoundError(f"hub adapter {ref.name} is not allowed here")
        repo, revision = parsed
        try:
            folder = Path(snapshot_download(repo, revision=revision, cache_dir=self.cache_dir,
                                            allow_patterns=[CONFIG_FILE, WEIGHTS_FILE, PROMPT_FILE]))  # fmt: skip
        except (RepositoryNotFoundError, LocalEntryNotFoundError) as err:
            raise FileNotFoundError(f"hub adapter {ref.name}: {str(err).splitlines()[0]}") from None
        except (HfHubHTTPError, OSError) as err:
            raise RegistryUnavailable(f"Hugging Face Hub: {ref.name}: {str(err).splitlines()[0]}") from err
        weights = folder / WEIGHTS_FILE
        if weights.is_file() and weights.stat().st_size > self.max_bytes:
            raise AdapterRejected(f"{ref.name}: {WEIGHTS_FILE} is {weights.stat().st_size} bytes (limit "
                                  f"{self.max_bytes})")  # fmt: skip
        reason = quick_check(folder)
        if reason is not None:
            raise AdapterRejected(f"{ref.name}: {reason}")
        return folder

    def list_refs(self) -> list[AdapterRef]:
        """Exact allowed repos only (a pattern `org/*` names no particular adapter)."""
        return [r for p in self.allowed if "*" not in p and (r := self.resolve(p)) is not None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--allow", action="append", default=[], help="allowed repo or org/* (repeatable)")
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args()
    source = HubSource(args.allow or [args.model.split("@")[0]], args.cache_dir)
    ref = source.resolve(args.model)
    if ref is None:
        raise SystemExit(f"error: '{args.model}' is not an allowed org/name[@revision]")
    print(source.fetch(ref))


if __name__ == "__main__":
    main()
