"""The one rule for which MLflow a job, a Serve replica or a CLI command talks to.

1. an explicit value (a config field or `--mlflow`); "" means none;
2. `$MLFLOW_TRACKING_URI` (`lorafleet up` sets it on its Ray head, so every job, trial, worker and Serve replica of
   the local stack inherits the stack's MLflow);
3. the running local stack's MLflow (`<state dir>/stack.json`; state dir `$LORAFLEET_STATE_DIR` or `.lorafleet` in the
   current directory), for commands run next to it;
4. the caller's fallback (`http://127.0.0.1:5000` for sweeps, none for serving and exports).

    python -m cluster.mlflow_uri          # print what this directory / environment resolves to
"""

from __future__ import annotations

import os
from pathlib import Path


def local_stack_mlflow(state_dir: Path | str | None = None) -> str | None:
    """The MLflow URL of the local stack recorded in the state dir, if its MLflow process is alive."""
    from cluster.stack_state import read_stack

    folder = Path(state_dir or os.environ.get("LORAFLEET_STATE_DIR") or ".lorafleet")
    try:
        info = read_stack(folder)
    except (OSError, ValueError):
        return None
    if info is None:
        return None
    from cluster.processes import find_process

    return info.mlflow_url if find_process(info.mlflow) is not None else None  # the recorded process, still alive


def resolve_mlflow_uri(explicit: str | None, fallback: str | None = None) -> str | None:
    """Apply the rule above; None means no MLflow."""
    if explicit is not None:
        return explicit or None
    return os.environ.get("MLFLOW_TRACKING_URI") or local_stack_mlflow() or fallback


def main() -> None:
    print(resolve_mlflow_uri(None) or "(none)")


if __name__ == "__main__":
    main()
