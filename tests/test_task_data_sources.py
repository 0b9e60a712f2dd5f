"""Where task data comes from (jobs/task_data/sources.py, load.py): JSONL, CSV, Parquet, Arrow, folders, saved datasets,
fsspec URIs (memory://, file://), the hub offline; the eval_fraction split; fingerprints; unreadable input.

    .venv/bin/python -m pytest -q tests/test_task_data_sources.py
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import datasets
import fsspec
import pytest

from jobs.task_config import TaskConfig
from jobs.task_data import DatasetError, load_task
from jobs.task_data.load import split_fraction

ROWS = [{"id": f"r{i}", "input": f"question {i}", "output": f"answer {i}"} for i in range(10)]


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def answers(examples) -> list[str]:
    return [e.reference for e in examples]


def test_jsonl_json_csv_parquet_and_arrow_load_the_same_rows(tmp_path: Path) -> None:
    (tmp_path / "t.jsonl").write_text(jsonl(ROWS))
    (tmp_path / "t.json").write_text(json.dumps(ROWS, indent=1))
    ds = datasets.Dataset.from_list(ROWS)
    ds.to_csv(tmp_path / "t.csv", index=False)
    ds.to_parquet(tmp_path / "t.parquet")
    ds.save_to_disk(tmp_path / "saved")  # its data file is an Arrow stream file
    (arrow,) = (tmp_path / "saved").glob("*.arrow")
    fingerprints = set()
    for name in ("t.jsonl", "t.json", "t.csv", "t.parquet", str(arrow)):
        data = load_task("t", TaskConfig(train=name, eval=name), base_dir=tmp_path)
        assert answers(data.train) == [r["output"] for r in ROWS], name
        assert data.train[3].id == "r3" and data.format == "input_output"
        fingerprints.add(data.fingerprint)
    assert len(fingerprints) == 5  # different bytes, different fingerprints


def test_csv_cells_stay_text(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("input,output\n007,1\n,2\n")
    data = load_task("t", TaskConfig(train="t.csv", eval="t.csv", format="prompt_completion",
                                     columns={"prompt": "input", "completion": "output"}), base_dir=tmp_path)  # fmt: skip
    assert [(e.prompt, e.completion) for e in data.train] == [("007", "1"), ("", "2")]


def test_a_folder_reads_its_data_files_in_sorted_order_with_their_own_row_numbers(tmp_path: Path) -> None:
    folder = tmp_path / "parts"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.jsonl").write_text(jsonl(ROWS[3:5]))
    (folder / "a.jsonl").write_text(jsonl(ROWS[:3]))
    (folder / "sub" / "c.jsonl").write_text(jsonl(ROWS[5:6]))
    (folder / "README.md").write_text("not data")
    (folder / ".hidden.jsonl").write_text("junk")
    data = load_task("t", TaskConfig(train="parts", eval_fraction=0.2), base_dir=tmp_path)
    everything = sorted(data.train + data.eval, key=lambda e: e.id)
    assert [e.where for e in everything] == ["parts/a.jsonl:1", "parts/a.jsonl:2", "parts/a.jsonl:3",
                                             "parts/b.jsonl:1", "parts/b.jsonl:2", "parts/sub/c.jsonl:1"]  # fmt: skip
    before = data.fingerprint
    (folder / "b.jsonl").write_text(jsonl(ROWS[3:4]) + jsonl([{**ROWS[4], "output": "changed"}]))
    assert load_task("t", TaskConfig(train="parts", eval_fraction=0.2), base_dir=tmp_path).fingerprint != before


def test_saved_dataset_splits(tmp_path: Path) -> None:
    datasets.DatasetDict(
        train=datasets.Dataset.from_list(ROWS[:8]), test=datasets.Dataset.from_list(ROWS[8:])
    ).save_to_disk(tmp_path / "saved")
    data = load_task("t", TaskConfig(train="saved", eval_split="test"), base_dir=tmp_path)
    assert answers(data.eval) == ["answer 8", "answer 9"] and len(data.train) == 8
    assert data.eval[0].where == "saved[test]:1"
    again = load_task("t", TaskConfig(train="saved", eval_split="test"), base_dir=tmp_path)
    assert again.fingerprint == data.fingerprint
    datasets.DatasetDict(
        train=datasets.Dataset.from_list(ROWS[:7]), test=datasets.Dataset.from_list(ROWS[7:])
    ).save_to_disk(tmp_path / "saved2")
    assert (
        load_task("t", TaskConfig(train="saved2", eval_split="test"), base_dir=tmp_path).fingerprint != data.fingerprint
    )
    with pytest.raises(DatasetError, match="eval_split: saved has no split 'validation'; its splits: train, test"):
        load_task("t", TaskConfig(train="saved", eval_split="validation"), base_dir=tmp_path)
    with pytest.raises(DatasetError, match="is data files without named splits"):
        (tmp_path / "t.jsonl").write_text(jsonl(ROWS))
        load_task("t", TaskConfig(train="t.jsonl", eval_split="test"), base_dir=tmp_path)


def test_fsspec_memory_and_file_uris(tmp_path: Path) -> None:
    root = f"lorafleet-test-{uuid.uuid4().hex[:8]}"
    fs = fsspec.filesystem("memory")
    fs.pipe(f"/{root}/train/part-0.jsonl", jsonl(ROWS[:6]).encode())
    fs.pipe(f"/{root}/train/part-1.jsonl", jsonl(ROWS[6:8]).encode())
    fs.pipe(f"/{root}/eval.jsonl", jsonl(ROWS[8:]).encode())
    try:
        data = load_task("t", TaskConfig(train=f"memory://{root}/train", eval=f"memory://{root}/eval.jsonl"))
    finally:
        fs.rm(f"/{root}", recursive=True)
    assert answers(data.train) == [f"answer {i}" for i in range(8)] and answers(data.eval) == ["answer 8", "answer 9"]
    assert data.train[7].where == f"memory://{root}/train/part-1.jsonl:2"
    saved = f"memory://{root}-saved"
    datasets.DatasetDict(
        train=datasets.Dataset.from_list(ROWS[:8]), test=datasets.Dataset.from_list(ROWS[8:])
    ).save_to_disk(saved)
    try:
        remote_saved = load_task("t", TaskConfig(train=saved, eval_split="test"))
    finally:
        fs.rm(f"/{root}-saved", recursive=True)
    assert answers(remote_saved.eval) == ["answer 8", "answer 9"] and remote_saved.eval[1].where == f"{saved}[test]:2"
    (tmp_path / "t.jsonl").write_text(jsonl(ROWS))
    uri = (tmp_path / "t.jsonl").as_uri()
    local = load_task("t", TaskConfig(train=uri, eval=uri))
    assert answers(local.train) == answers(local.eval) == [r["output"] for r in ROWS]


def test_missing_files_are_clear(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"task t: train: nope.jsonl: file not found \(looked for .*nope.jsonl\)"):
        load_task("t", TaskConfig(train="nope.jsonl", eval_fraction=0.1), base_dir=tmp_path)
    with pytest.raises(DatasetError, match=r"train: memory://nothing-here-[0-9a-f]+/x.jsonl: not found"):
        load_task("t", TaskConfig(train=f"memory://nothing-here-{uuid.uuid4().hex}/x.jsonl", eval_fraction=0.1))


def test_a_scheme_without_its_backend_names_the_package() -> None:
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("gcsfs is installed here")
    with pytest.raises(
        DatasetError, match=r"train: gs://bucket/t.jsonl: reading gs:// needs gcsfs \(pip install gcsfs\)"
    ):
        load_task("t", TaskConfig(train="gs://bucket/t.jsonl", eval_fraction=0.1))


def test_json_text_stays_exactly_as_written(tmp_path: Path) -> None:
    """Date-like and number-like strings are not turned into timestamps or numbers (pyarrow's JSON reader would
    read "2021-03-05" as a timestamp: the bundled date_normalisation answers are such strings)."""
    rows = [{"input": "the 5th of March 2021", "output": "2021-03-05"}, {"input": "007", "output": "1e3"}]
    (tmp_path / "t.jsonl").write_text(jsonl(rows))
    (tmp_path / "t.json").write_text(json.dumps({"data": rows}))
    for name in ("t.jsonl", "t.json"):
        data = load_task("t", TaskConfig(train=name, eval=name), base_dir=tmp_path)
        assert answers(data.train) == ["2021-03-05", "1e3"], name
    (tmp_path / "bad.jsonl").write_text(jsonl(rows) + "{not json\n")
    with pytest.raises(DatasetError, match=r"bad.jsonl:3: invalid JSON"):
        load_task("t", TaskConfig(train="bad.jsonl", eval="t.jsonl"), base_dir=tmp_path)


def test_hub_id_offline_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        DatasetError, match=r"'someorg/no-such-set' is not a local file or folder .* Hub cannot be reached"
    ):
        load_task("t", TaskConfig(train="someorg/no-such-set", eval_fraction=0.1), base_dir=tmp_path)


def test_hub_ids_pick_the_configured_splits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub path without a network: `datasets.load_dataset` serves a saved DatasetDict for the id, the way the
    real one answers for a hub id (a split by name, every split for split=None, an error for an unknown split)."""
    datasets.DatasetDict(
        train=datasets.Dataset.from_list(ROWS[:7]), test=datasets.Dataset.from_list(ROWS[7:])
    ).save_to_disk(tmp_path / "hub-copy")
    calls = []

    def hub(path: str, name: str | None = None, split: str | None = None, **kwargs):
        calls.append((path, name, split))
        if path != "someorg/tickets":
            raise FileNotFoundError(f"Dataset '{path}' doesn't exist on the Hub")
        every = datasets.load_from_disk(str(tmp_path / "hub-copy"))
        if split is not None and split not in every:
            raise ValueError(f'Unknown split "{split}". Should be one of {list(every)}.')
        return every if split is None else every[split]

    monkeypatch.setattr(datasets, "load_dataset", hub)
    data = load_task("t", TaskConfig(train="someorg/tickets", eval_split="test", subset="en"), base_dir=tmp_path)
    assert calls == [("someorg/tickets", "en", "train"), ("someorg/tickets", "en", "test")]
    assert len(data.train) == 7 and answers(data.eval) == ["answer 7", "answer 8", "answer 9"]
    assert data.eval[0].where == "someorg/tickets[test]:1"
    with pytest.raises(DatasetError, match=r"someorg/tickets' is not a local file .*Unknown split \"dev\""):
        load_task("t", TaskConfig(train="someorg/tickets", eval_split="dev"), base_dir=tmp_path)
    with pytest.raises(DatasetError, match=r"eval: someorg/tickets has splits train, test; declare train and eval"):
        load_task("t", TaskConfig(train="someorg/tickets", eval="someorg/tickets"), base_dir=tmp_path)
    with pytest.raises(DatasetError, match=r"cannot be loaded from the Hugging Face Hub: FileNotFoundError"):
        load_task("t", TaskConfig(train="someorg/other", eval_fraction=0.2), base_dir=tmp_path)


def test_unreadable_inputs(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("hello")
    with pytest.raises(DatasetError, match=r"t.txt: unsupported file type '.txt'; use one of .jsonl, .json, .csv"):
        load_task("t", TaskConfig(train="t.txt", eval_fraction=0.1), base_dir=tmp_path)
    (tmp_path / "broken.jsonl").write_text('{"input": "a", "output": "b"}\n{"input": "c", "output\n')
    with pytest.raises(DatasetError, match=r"broken.jsonl:2: invalid JSON \(Unterminated string"):
        load_task("t", TaskConfig(train="broken.jsonl", eval_fraction=0.1), base_dir=tmp_path)
    (tmp_path / "latin1.jsonl").write_bytes(b'{"input": "a", "output": "b"}\n{"input": "caf\xe9", "output": "d"}\n')
    with pytest.raises(DatasetError, match=r"latin1.jsonl: invalid UTF-8 at byte 44 \(line 2\)"):
        load_task("t", TaskConfig(train="latin1.jsonl", eval_fraction=0.1), base_dir=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"train: empty: the folder holds no data files"):
        load_task("t", TaskConfig(train="empty", eval_fraction=0.1), base_dir=tmp_path)


def test_empty_splits_are_refused(tmp_path: Path) -> None:
    (tmp_path / "t.jsonl").write_text(jsonl(ROWS))
    (tmp_path / "none.jsonl").write_text("\n")
    with pytest.raises(DatasetError, match=r"task t: none.jsonl: no rows \(an empty split\)"):
        load_task("t", TaskConfig(train="t.jsonl", eval="none.jsonl"), base_dir=tmp_path)
    (tmp_path / "one.jsonl").write_text(jsonl(ROWS[:1]))
    with pytest.raises(DatasetError, match="eval_fraction: 1 row"):
        load_task("t", TaskConfig(train="one.jsonl", eval_fraction=0.5), base_dir=tmp_path)


def test_eval_fraction_is_seeded_disjoint_and_max_rows_applies_after(tmp_path: Path) -> None:
    (tmp_path / "t.jsonl").write_text(jsonl(ROWS))
    config = TaskConfig(train="t.jsonl", eval_fraction=0.3, split_seed=7)
    a, b = (load_task("t", config, base_dir=tmp_path) for _ in range(2))
    assert answers(a.eval) == answers(b.eval) and a.fingerprint == b.fingerprint
    assert len(a.eval) == 3 and len(a.train) == 7
    assert not {e.id for e in a.eval} & {e.id for e in a.train}
    assert sorted(e.id for e in a.train + a.eval) == sorted(r["id"] for r in ROWS)
    other = load_task("t", config.model_copy(update={"split_seed": 8}), base_dir=tmp_path)
    assert answers(other.eval) != answers(a.eval) and other.fingerprint != a.fingerprint
    capped = load_task("t", config.model_copy(update={"max_rows": 2}), base_dir=tmp_path)
    assert answers(capped.train) == answers(a.train)[:2] and answers(capped.eval) == answers(a.eval)
    # the split is a pure function of (rows, fraction, seed): same as calling it directly
    train, held = split_fraction(list(range(10)), 0.3, 7)  # type: ignore[arg-type]
    assert [f"answer {i}" for i in held] == answers(a.eval)


def test_fingerprint_covers_config_fields_that_change_rows(tmp_path: Path) -> None:
    (tmp_path / "t.jsonl").write_text(jsonl(ROWS))
    base = TaskConfig(train="t.jsonl", eval="t.jsonl")
    first = load_task("t", base, base_dir=tmp_path).fingerprint
    assert len(first) == 16 and int(first, 16) >= 0
    assert load_task("other-name", base, base_dir=tmp_path).fingerprint == first
    assert load_task("t", base.model_copy(update={"overlength": "drop"}), base_dir=tmp_path).fingerprint == first
    # the resolved format counts, not how it was chosen: auto and an explicit input_output give the same rows
    assert load_task("t", base.model_copy(update={"format": "input_output"}), base_dir=tmp_path).fingerprint == first
    changed = [{"instruction": "Be brief."}, {"max_rows": 3}, {"columns": {"id": "output"}}]
    for update in changed:
        assert load_task("t", base.model_copy(update=update), base_dir=tmp_path).fingerprint != first, update
