"""Errors raised for bad input data: always name the file (and row, where there is one) and the problem."""

from __future__ import annotations


class DataFormatError(ValueError):
    """A dataset file is missing, unreadable or holds something the format does not allow."""

    def __init__(self, path: object, problem: str, row: int | None = None) -> None:
        self.path = str(path)
        self.problem = problem
        self.row = row
        where = self.path if row is None else f"{self.path}, row {row}"
        super().__init__(f"{where}: {problem}")

    def __reduce__(self) -> tuple[type, tuple[str, str, int | None]]:
        # Raised inside Ray workers and re-raised on the driver: pickle the constructor's arguments, not ``args``.
        return (type(self), (self.path, self.problem, self.row))
