"""The one exception the data layer raises for bad input: `DataError`."""

from __future__ import annotations


class DataError(ValueError):
    """A problem with the user's data, located by file and 1-based row.

    `row` is what an editor shows: the line number for JSONL, the 1-based record index for
    JSON arrays, Parquet and in-memory data, and the line number for CSV (the header is line
    1, so the first record is line 2). `None` means the problem concerns the whole file.

    >>> str(DataError("data.jsonl", 7, "column 'chosen' is empty"))
    "data.jsonl, row 7: column 'chosen' is empty"
    """

    def __init__(self, file: str, row: int | None, problem: str) -> None:
        self.file = str(file)
        self.row = row
        self.problem = problem
        super().__init__(self._message())

    def _message(self) -> str:
        if self.row is None:
            return f"{self.file}: {self.problem}"
        # CSV rows are reported as the editor line they start on (header = line 1).
        unit = "line" if self.file.lower().endswith((".csv", ".csv.gz")) else "row"
        return f"{self.file}, {unit} {self.row}: {self.problem}"

    def __reduce__(self):  # keep the three-argument constructor picklable (DataLoader workers)
        return (type(self), (self.file, self.row, self.problem))
