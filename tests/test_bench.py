"""The serving benchmark's harness (bench/serve_mixed.py): every case decodes the same requests to the same number
of tokens, the mixed cases really mix, and the ratios and targets are computed from the samples. Timing itself is
not asserted (performance lives in the benchmark, not in tests)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench import serve_mixed
from bench.runners import Sample
from bench.serve_mixed import BASE_KEY, PLAIN_BASE_KEY, Case, Row, summarize, targets
from bench.workload import Workload


def test_a_small_run_covers_every_case_with_the_same_tokens(tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    try:
        code = serve_mixed.main(["--requests", "6", "--max-new-tokens", "3", "--adapters", "1,3", "--repeats", "2",
                                 "--threads", "1", "--json", str(out)])  # fmt: skip
    finally:
        torch.set_num_threads(threads)  # (--threads sets the process-wide count)
    assert code == 0  # (no --strict: a miss is reported, not an error)
    report = json.loads(out.read_text())
    keys = ["engine-base", "engine-mixed-1", "engine-mixed-3", "peft-mixed", "peft-swap", "hf-base"]
    assert [row["key"] for row in report["rows"]] == keys
    for key in keys:
        assert [s["tokens"] for s in report["samples"][key]] == [6 * 3, 6 * 3]  # 2 repeats, every request x 3
    mixed = {row["key"]: row["most_mixed"] for row in report["rows"]}
    assert mixed["engine-base"] == 0 and mixed["engine-mixed-1"] == 1
    assert mixed["engine-mixed-3"] == 3 and mixed["peft-mixed"] == 3  # one forward really held 3 adapters
    rows = {row["key"]: row for row in report["rows"]}
    base = rows[BASE_KEY]["tokens_per_s"]
    assert rows["engine-mixed-3"]["vs_base"] == pytest.approx(rows["engine-mixed-3"]["tokens_per_s"] / base)
    assert [t["ratio"] for t in report["targets"]] == ["engine-mixed-3 / engine-base", "engine-mixed-3 / peft-mixed"]
    printed = capsys.readouterr().out
    assert "engine, 3 mixed adapters" in printed and "(target >= 0.8x)" in printed and "for scale:" in printed


def _row(key: str, adapters: int, vs_base: float, vs_peft: float) -> Row:
    return Row(key, key, adapters, adapters, 1.0, (1.0, 1.0), vs_base, vs_peft, vs_base, [1.0])


def test_targets_judge_the_widest_mixed_case() -> None:
    rows = [_row(BASE_KEY, 0, 1.0, 9.0), _row("engine-mixed-1", 1, 0.95, 8.0), _row("engine-mixed-32", 32, 0.79, 5.1)]
    assert targets(rows) == [("engine-mixed-32 / engine-base", 0.79, 0.8, False),
                             ("engine-mixed-32 / peft-mixed", 5.1, 5.0, True)]  # fmt: skip
    rows[-1] = _row("engine-mixed-32", 32, 0.8, 5.0)
    assert all(met for *_, met in targets(rows))  # the bounds are inclusive
    assert targets([_row(BASE_KEY, 0, 1.0, 9.0)]) == []  # nothing mixed: nothing to judge


@pytest.mark.parametrize(("args", "named"), [(["--adapters", "0,4"], "--adapters"), (["--repeats", "0"], "--repeats"),
                                             (["--kernel", "fast"], "--kernel")])  # fmt: skip
def test_bad_arguments_are_refused_by_name(args: list[str], named: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        serve_mixed.parse_args(args)
    assert exit_info.value.code == 2 and named in capsys.readouterr().err


def test_ratios_use_the_faster_base_only_case() -> None:
    """With the LoRA side thread the engine's own base-only run has one PyTorch thread fewer; the ratios are taken
    against the faster of it and the all-threads engine, whichever that is."""
    work = Workload("w", [[1, 2]], [None], 4)
    mixed = work.with_adapters("m", ["a"])
    cases = [Case(BASE_KEY, "base", work, None), Case(PLAIN_BASE_KEY, "plain", work, None),  # type: ignore[arg-type]
             Case("engine-mixed-1", "mixed", mixed, None)]  # type: ignore[arg-type]  # fmt: skip
    for plain_seconds, want in ((1.0, 0.4), (4.0, 0.8)):  # tokens/s: base 50, plain 100 or 25, mixed 40
        samples = {BASE_KEY: [Sample(100, 2.0, 2.0, 0)], PLAIN_BASE_KEY: [Sample(100, plain_seconds, 1.0, 0)],
                   "engine-mixed-1": [Sample(100, 2.5, 2.5, 1)]}  # fmt: skip
        rows = {r.key: r for r in summarize(cases, samples)}
        faster = max(100 / 2.0, 100 / plain_seconds)
        assert rows["engine-mixed-1"].vs_base == pytest.approx((100 / 2.5) / faster) == pytest.approx(want)
