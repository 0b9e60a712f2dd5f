"""Score one prediction against one reference from the command line and print the score (0..1).

python -m jobs.metrics rouge_l "the cat sat on the mat" "the cat is on the mat"        # 0.8333
python -m jobs.metrics choice "I think positive" positive --labels positive,negative   # 1.0000
python -m jobs.metrics regex "Answer: B" B --pattern "Answer:\\s*(\\w)"                   # 1.0000
"""

from __future__ import annotations

import argparse

from jobs.metrics.dispatch import ALIASES, METRIC_NAMES, score


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.metrics", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("metric", choices=METRIC_NAMES)
    parser.add_argument("prediction")
    parser.add_argument("reference")
    parser.add_argument("--labels", help="choice: comma-separated label set")
    parser.add_argument("--fields", help="json_fields: comma-separated keys to score")
    parser.add_argument("--tolerance", type=float, help="numeric: allowed relative difference")
    parser.add_argument("--pattern", help="regex: extracts the answer (group 1 if it has groups)")
    args = parser.parse_args(argv)

    from pydantic import ValidationError

    from jobs.task_config import MetricConfig

    options = {
        "labels": args.labels.split(",") if args.labels else None,
        "fields": args.fields.split(",") if args.fields else None,
        "tolerance": args.tolerance,
        "pattern": args.pattern,
    }
    try:
        metric = MetricConfig(
            name=ALIASES.get(args.metric, args.metric), **{k: v for k, v in options.items() if v is not None}
        )
        value = score(metric, args.prediction, args.reference)
    except ValidationError as err:
        parser.error("; ".join(e["msg"].removeprefix("Value error, ") for e in err.errors()))
    except ValueError as err:
        parser.error(str(err))
    print(f"{value:.4f}")


if __name__ == "__main__":
    main()
