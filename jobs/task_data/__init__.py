"""A task's data, from configuration: read files / saved / hub / fsspec datasets (via Hugging Face `datasets`), detect
and convert the row format, split, fingerprint, and check it before any compute is spent.

Modules: `sources` (read one source), `formats` (detect a format, row -> Example), `load` (`load_task`), `check`
(`check_task` and the `python -m jobs.task_data.check CONFIG` report), `render` (an encoded example with its trained
part marked). Encoding to token ids lives in jobs/data.py (`encode_example`, `encode_examples`, `eval_prompt_ids`).

    from jobs.task_data import load_task
    data = load_task("ticket_triage", task_config)
"""

from jobs.task_data.errors import DatasetError
from jobs.task_data.example import Example, TaskData
from jobs.task_data.formats import detect_format
from jobs.task_data.load import load_task

__all__ = ["DatasetError", "Example", "TaskData", "detect_format", "load_task"]
