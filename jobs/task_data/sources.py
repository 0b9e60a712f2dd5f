"""Read one data source of a task into raw rows with the Hugging Face `datasets` library, plus its fingerprint.

A source is a local JSONL/JSON/CSV/TSV/Parquet/Arrow file or a folder of them, a `save_to_disk` folder, the same
behind an fsspec URI (`s3://`, `gs://`, `memory://`, `file://`, ...), or a Hugging Face hub dataset id (honours
HF_HUB_OFFLINE and the local cache). Relative paths resolve against `base_dir`. Files are read one by one (each row
keeps its file and row number for error messages) into a throw-away cache folder, so nothing stale is reused.
Fingerprints: sha256 of the files' bytes (sorted by path), or the dataset's own fingerprint for saved/hub datasets.

    from jobs.task_data.sources import read_source
    source = read_source("data/train.jsonl", key="train", base_dir=Path.cwd(), split="train", cache_dir=tmp)
    source.files[0].rows[0]      # {"input": ..., "output": ...}
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.task_data.errors import DatasetError

# File extension -> datasets builder. Text formats are checked for valid UTF-8 before parsing.
BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
TEXT_EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv")
SAVED_MARKERS = ("dataset_dict.json", "state.json")  # what save_to_disk writes (DatasetDict / Dataset)
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_FSSPEC_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}


@dataclass(frozen=True)
class RawFile:
    """The rows of one file (or one split of a dataset). `name` is what error messages call it."""

    name: str
    rows: list[dict[str, Any]]
    columns: list[str]


@dataclass(frozen=True)
class RawSource:
    kind: str  # "files" | "saved" | "hub"
    files: list[RawFile]
    fingerprint: str  # sha256 hex of the content (files) or dataset fingerprint + split


def _datasets() -> Any:
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its parse errors are re-raised as DatasetError
    return datasets


def root_cause(err: BaseException) -> str:
    """The innermost chained exception as 'Type: message' (datasets wraps parser errors several times)."""
    while err.__cause__ is not None or (err.__context__ is not None and not err.__suppress_context__):
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}" if text else type(err).__name__


def check_utf8(data: bytes, name: str) -> None:
    """Raise DatasetError naming the file, byte offset and line of the first invalid UTF-8 sequence."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DatasetError(
            f"{name}: invalid UTF-8 at byte {err.start} (line {line}): {data[err.start : err.start + 4]!r}; "
            "save the file as UTF-8"
        ) from None


def _filesystem(spec: str, key: str) -> tuple[Any, str]:
    from fsspec.core import url_to_fs

    try:
        return url_to_fs(spec)
    except ImportError as err:
        scheme = spec.split("://", 1)[0].lower()
        package = _FSSPEC_PACKAGES.get(scheme, f"the fsspec backend for {scheme}://")
        raise DatasetError(f"{key}: {spec}: reading {scheme}:// needs {package} (pip install {package})") from err
    except ValueError as err:
        raise DatasetError(f"{key}: {spec}: not a readable URI ({err})") from None


def _json_rows(data: bytes, ext: str, name: str) -> RawFile:
    """JSON / JSONL rows exactly as written. Parsed with Python's json module, not the `datasets` JSON builder:
    pyarrow's JSON reader turns text that looks like a date ("2021-03-05") into a timestamp, which would change the
    very strings a task trains on (the bundled date_normalisation task's answers, for one)."""
    text = data.decode("utf-8-sig")
    if ext == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DatasetError(f"{name}:{number}: invalid JSON ({err.msg} at column {err.colno})") from None
    else:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise DatasetError(f"{name}: invalid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
        lists = [v for v in value.values() if isinstance(v, list)] if isinstance(value, dict) else []
        rows = value if isinstance(value, list) else lists[0] if len(lists) == 1 else None
        if rows is None:
            raise DatasetError(f"{name}: expected a JSON list of rows (or an object holding one list of rows)")
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise DatasetError(f"{name}:{number}: expected a JSON object per row, got {type(row).__name__}")
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return RawFile(name, rows, columns)


def _load_file(location: str, ext: str, name: str, data: bytes, cache_dir: str) -> RawFile:
    if not data.strip():
        return RawFile(name, [], [])
    if ext in (".json", ".jsonl"):
        return _json_rows(data, ext, name)
    datasets = _datasets()
    builder = BUILDERS[ext]
    options: dict[str, Any] = {}
    if builder == "csv":  # every cell as text ("007" stays "007"); an empty cell is "" (not NaN)
        sep = "\t" if ext == ".tsv" else ","
        header = next(csv.reader(io.StringIO(data.decode("utf-8-sig")), delimiter=sep), [])
        features = datasets.Features({column: datasets.Value("string") for column in header})
        options = {"sep": sep, "keep_default_na": False, "features": features}
    try:
        ds = datasets.load_dataset(builder, data_files=[location], split="train", cache_dir=cache_dir, **options)
    except Exception as err:  # datasets/pyarrow/pandas raise many types for a malformed file
        raise DatasetError(f"{name}: cannot read it as {ext[1:]}: {root_cause(err)}") from None
    return RawFile(name, ds.to_list(), list(ds.column_names))


def _pick_split(obj: Any, spec: str, key: str, split: str | None, split_required: bool) -> tuple[Any, str]:
    """A Dataset from a Dataset or DatasetDict: the named split, or the only one when `split` is None."""
    datasets = _datasets()
    if isinstance(obj, datasets.DatasetDict):
        names = list(obj)
        if split is None:
            if len(names) != 1:
                raise DatasetError(f"{key}: {spec} has splits {', '.join(names)}; declare train and eval as one "
                                   "dataset with train_split / eval_split")  # fmt: skip
            split = names[0]
        if split not in obj:
            raise DatasetError(f"{key}: {spec} has no split '{split}'; its splits: {', '.join(names)}")
        return obj[split], split
    if split_required:
        raise DatasetError(f"{key}: {spec} is one dataset without splits; use eval_fraction or eval: <path>")
    return obj, "train"


def _saved(location: str, spec: str, key: str, split: str | None, split_required: bool) -> RawSource:
    try:
        obj = _datasets().load_from_disk(location)
    except Exception as err:
        raise DatasetError(f"{key}: {spec}: cannot read the saved dataset: {root_cause(err)}") from None
    ds, split = _pick_split(obj, spec, key, split, split_required)
    digest = hashlib.sha256(f"saved\0{ds._fingerprint}\0{split}".encode()).hexdigest()
    return RawSource("saved", [RawFile(f"{spec}[{split}]", ds.to_list(), list(ds.column_names))], digest)


def _hub(spec: str, key: str, local: str, split: str | None, split_required: bool, subset: str | None) -> RawSource:
    datasets = _datasets()
    try:
        obj = datasets.load_dataset(spec, subset, split=split)
    except Exception as err:
        cause = root_cause(err)
        head = f"{key}: '{spec}' is not a local file or folder (looked for {local}) and "
        if "Offline" in cause or isinstance(err, ConnectionError):
            raise DatasetError(head + "the Hugging Face Hub cannot be reached (HF_HUB_OFFLINE is set or no network) "
                               "with no cached copy; load it once with network access, or download its files and "
                               "point to them") from None  # fmt: skip
        raise DatasetError(head + f"cannot be loaded from the Hugging Face Hub: {cause}") from None
    # load_dataset(split=name) returns that split (and refuses an unknown one); split=None returns every split
    ds, split = (obj, split) if split is not None else _pick_split(obj, spec, key, None, split_required)
    digest = hashlib.sha256(f"hub\0{spec}\0{subset}\0{ds._fingerprint}\0{split}".encode()).hexdigest()
    return RawSource("hub", [RawFile(f"{spec}[{split}]", ds.to_list(), list(ds.column_names))], digest)


def _data_files(fs: Any, path: str, spec: str, key: str) -> list[str]:
    found = sorted(
        p for p in fs.find(path)
        if posixpath.splitext(p)[1].lower() in BUILDERS
        and not any(part.startswith(".") for part in posixpath.relpath(p, path).split("/"))
    )  # fmt: skip
    if not found:
        raise DatasetError(f"{key}: {spec}: the folder holds no data files ({', '.join(BUILDERS)})")
    return found


def read_source(spec: str, *, key: str, base_dir: Path, split: str | None, cache_dir: str,
                split_required: bool = False, subset: str | None = None) -> RawSource:  # fmt: skip
    """Read `spec` (see the module docstring). `key` ("train"/"eval") prefixes source-level errors; `split` names
    the split of a saved/hub dataset (None: its only one); plain files ignore it."""
    remote = bool(_URI.match(spec))
    if remote:
        fs, path = _filesystem(spec, key)
        local = spec
    else:
        resolved = Path(spec).expanduser()
        resolved = resolved if resolved.is_absolute() else base_dir / resolved
        local = str(resolved)
        if not resolved.exists():
            if _HUB_ID.match(spec) and posixpath.splitext(spec)[1].lower() not in BUILDERS:
                return _hub(spec, key, local, split, split_required, subset)
            raise DatasetError(f"{key}: {spec}: file not found (looked for {local})")
        fs, path = _filesystem(str(resolved.resolve()), key)
    if fs.isdir(path):
        if any(fs.exists(posixpath.join(path, marker)) for marker in SAVED_MARKERS):
            return _saved(spec if remote else path, spec, key, split, split_required)
        paths, shown = _data_files(fs, path, spec, key), spec.rstrip("/") + "/"
    elif fs.isfile(path):
        paths, shown = [path], ""
    else:
        raise DatasetError(f"{key}: {spec}: not found")
    if split_required:
        raise DatasetError(f"{key}: {spec} is data files without named splits; use eval: <path> or eval_fraction")
    digest = hashlib.sha256(b"files")
    files = []
    for p in paths:
        rel = posixpath.relpath(p, path) if shown else ""
        name = shown + rel if shown else spec
        ext = posixpath.splitext(p)[1].lower()
        if ext not in BUILDERS:
            raise DatasetError(f"{name}: unsupported file type '{ext or '(none)'}'; use one of {', '.join(BUILDERS)}")
        try:
            data = fs.cat_file(p)
        except OSError as err:
            raise DatasetError(f"{name}: cannot read the file: {root_cause(err)}") from None
        if ext in TEXT_EXTENSIONS:
            check_utf8(data, name)
        digest.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
        location = p
        if remote:  # parse the bytes already fetched (datasets itself refuses URLs when HF_HUB_OFFLINE is set)
            location = str(Path(cache_dir) / "remote" / f"{len(files)}-{posixpath.basename(p)}")
            Path(location).parent.mkdir(parents=True, exist_ok=True)
            Path(location).write_bytes(data)
        files.append(_load_file(location, ext, name, data, cache_dir))
    return RawSource("files", files, digest.hexdigest())
