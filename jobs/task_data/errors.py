"""The one error type of task-data loading and encoding: `DatasetError`, whose message names the file (or dataset),
the row and the column, and says what to change. Raised by jobs.task_data.load / formats and jobs.data.

    from jobs.task_data.errors import DatasetError
"""

from __future__ import annotations


class DatasetError(ValueError):
    """Task data that cannot be used; the message is meant for the user as is (file, row, column, what to do)."""
