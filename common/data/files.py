"""A user's own labeled text: a CSV or JSONL file with a text column and a label column.

Every problem is reported with the file, the line and what to do, because this is the path users take
with their private data and a silent skip would be data loss.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from common.data.dataset import TextDataset
from common.errors import DataError

SUFFIXES = (".csv", ".jsonl")


def load_labeled_file(path: Path, text_column: str, label_column: str, labels: str = "") -> TextDataset:
    """Read `path`; `labels` ("a,b,c") fixes the allowed label values and their order, else inferred."""
    if not path.is_file():
        raise DataError(f"{path}: data file not found (set dataset to \"wordnet\" or an existing .csv/.jsonl)")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type {suffix or '(none)'}; use .csv or .jsonl")
    try:
        raw = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 ({err.reason}); re-save the file as UTF-8") from None
    rows = _read_csv(path, raw, text_column, label_column) if suffix == ".csv" else _read_jsonl(
        path, raw, text_column, label_column
    )
    if not rows:
        raise DataError(f"{path}: no examples found")
    allowed = [name.strip() for name in labels.split(",") if name.strip()]
    label_names = allowed or sorted({label for _, label, _ in rows})
    if len(label_names) < 2:
        raise DataError(f"{path}: found a single label {label_names!r}; classification needs at least two")
    index = {name: i for i, name in enumerate(label_names)}
    texts, label_ids = [], []
    for text, label, line in rows:
        if label not in index:
            raise DataError(
                f"{path}:{line}: label {label!r} is not one of the configured labels {', '.join(label_names)}"
            )
        texts.append(text)
        label_ids.append(index[label])
    return TextDataset(texts=texts, labels=label_ids, label_names=label_names, source=str(path))


def _check_row(path: Path, line: int, text, label) -> tuple[str, str, int]:
    if text is None or (isinstance(text, str) and not text.strip()):
        raise DataError(f"{path}:{line}: empty text")
    if label is None or (isinstance(label, str) and not label.strip()):
        raise DataError(f"{path}:{line}: empty label")
    if not isinstance(text, str):
        raise DataError(f"{path}:{line}: text must be a string, got {type(text).__name__}")
    if isinstance(label, (dict, list, float)) and not (isinstance(label, float) and label.is_integer()):
        raise DataError(f"{path}:{line}: label must be a string or an integer, got {label!r}")
    if isinstance(label, float):
        label = int(label)
    return text.strip(), str(label).strip(), line


def _read_csv(path: Path, raw: str, text_column: str, label_column: str):
    reader = csv.DictReader(raw.splitlines())
    header = reader.fieldnames or []
    for column in (text_column, label_column):
        if column not in header:
            raise DataError(
                f"{path}:1: no column {column!r} in the header {header}; set text-column/label-column"
            )
    rows = []
    try:
        for record in reader:
            line = reader.line_num
            if not any((value or "").strip() for value in record.values() if isinstance(value, str)):
                continue  # blank line
            if None in record:
                raise DataError(f"{path}:{line}: more fields than the header has columns")
            rows.append(_check_row(path, line, record.get(text_column), record.get(label_column)))
    except csv.Error as err:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({err})") from None
    return rows


def _read_jsonl(path: Path, raw: str, text_column: str, label_column: str):
    rows = []
    for line, content in enumerate(raw.splitlines(), start=1):
        if not content.strip():
            continue
        try:
            record = json.loads(content)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{line}: invalid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{line}: expected a JSON object, got {type(record).__name__}")
        for column in (text_column, label_column):
            if column not in record:
                raise DataError(f"{path}:{line}: missing key {column!r}; set text-column/label-column")
        rows.append(_check_row(path, line, record[text_column], record[label_column]))
    return rows
