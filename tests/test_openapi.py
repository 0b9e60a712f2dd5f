"""The OpenAPI document is the truth: schemathesis generates requests for every operation of `/openapi.json` (schema-
valid and schema-invalid ones, a fixed seed, at least MIN_CASES counted as sent) against the in-process app on the
tiny model, and runs all its checks on every response (status codes, content types, headers and bodies as
documented; no 5xx; invalid data refused, valid data accepted). It must find nothing.

Valid data may still be refused for what a schema cannot say (an unknown model is 404, an adapter for another base
422, a prompt over the context limit 400): those statuses are the positive-data check's expected ones. Invalid
data may also be refused as too large (413, the body limit is checked before parsing).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import hypothesis
from api_harness import build, write_catalog

MIN_CASES = 500
PER_OPERATION = 55  # per operation and mode (positive, negative): 5 with inputs -> 550, + 2 GETs
CONFIG = """
[checks.positive_data_acceptance]
expected-statuses = ["2XX", "400", "404", "422"]

[checks.negative_data_rejection]
expected-statuses = ["400", "401", "404", "405", "413", "415", "422", "429"]
"""


def test_schemathesis_all_checks_find_nothing(tiny_base: Any, tiny_shapes: Any, tmp_path: Path) -> None:
    import schemathesis
    from schemathesis import GenerationMode
    from schemathesis.config import SchemathesisConfig

    catalog = write_catalog(tmp_path / "catalog", tiny_shapes, count=1)
    engine = {"max_seq_len": 64, "max_loras": 2, "max_running": 8, "max_queue": 64}
    with build(tiny_base, catalog, engine=engine, default_max_tokens=8, max_request_bytes=20_000) as (app, _):
        schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=SchemathesisConfig.from_str(CONFIG))
        sent: Counter[str] = Counter()
        failures: list[str] = []
        for result in schema.get_all_operations():
            operation = result.ok()
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                label = f"{operation.label} {mode.value}"

                @hypothesis.seed(20261204)
                @hypothesis.settings(max_examples=PER_OPERATION, deadline=None, database=None, derandomize=False,
                                     suppress_health_check=list(hypothesis.HealthCheck), phases=[
                                         hypothesis.Phase.explicit, hypothesis.Phase.generate])  # fmt: skip
                @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
                def run(case: Any) -> None:
                    sent[label] += 1  # noqa: B023 (run() is called right here, in this iteration)
                    try:
                        case.call_and_validate()
                    except (
                        Exception,
                        BaseExceptionGroup,
                    ) as err:  # keep going: report every distinct failure at the end
                        failures.append(f"{label}: {str(err)[:600]}")  # noqa: B023

                try:
                    run()
                except hypothesis.errors.Unsatisfiable:  # no invalid request exists (e.g. GET /health: no inputs)
                    assert mode == GenerationMode.NEGATIVE, label
    print(f"\nschemathesis cases sent: {sum(sent.values())} {dict(sent)}")
    assert not failures, "\n\n".join(sorted(set(failures))[:10])
    assert sum(sent.values()) >= MIN_CASES, dict(sent)
