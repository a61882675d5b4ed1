"""Reading an uploaded CSV or JSONL file into rows, reporting problems per row.

The csv module does the CSV work (quoted fields with commas and newlines, doubled quotes).
Bytes are decoded as UTF-8 with `surrogateescape`, so one row with a stray Latin-1 byte is
reported as that row's error while every other row proceeds; a UTF-16 file (with its BOM) is
decoded as such. A JSON line is read by jobs.inputs: one that nests too deep or holds a lone
surrogate or NUL (escapes that decode to text no database or page can hold) is that row's
error. Problems with the whole file (not a CSV, too many rows) are file errors.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
from dataclasses import dataclass, field

from jobs import inputs

BAD_BYTE_RE = re.compile(r"[\udc80-\udcff]")


@dataclass
class ParsedRow:
    number: int  # 1-based data row (the header is not counted)
    data: dict[str, str]
    error: str = ""


@dataclass
class ParsedFile:
    file_format: str
    columns: list[str] = field(default_factory=list)
    rows: list[ParsedRow] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def parse_upload(filename: str, data: bytes, *, max_rows: int) -> ParsedFile:
    name = filename.lower()
    if name.endswith((".jsonl", ".ndjson")):
        return parse_jsonl(data, max_rows=max_rows)
    return parse_csv(data, max_rows=max_rows)


def decode(data: bytes) -> str:
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return data.decode("utf-16", errors="replace")
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    return data.decode("utf-8", errors="surrogateescape")


def _bad_bytes(value: str) -> str:
    """The first undecodable byte in `value` as hex, or ''."""
    match = BAD_BYTE_RE.search(value)
    return f"0x{ord(match.group()) - 0xDC00:02x}" if match else ""


def _printable(value: str) -> str:
    # Undecodable bytes are shown as U+FFFD, never stored as lone surrogates (not valid UTF-8).
    return BAD_BYTE_RE.sub("\ufffd", value)


def _unique_columns(header: list[str]) -> list[str]:
    columns: list[str] = []
    for index, raw in enumerate(header, start=1):
        name = _printable(raw).strip() or f"column_{index}"
        candidate, n = name, 2
        while candidate in columns:
            candidate, n = f"{name}_{n}", n + 1
        columns.append(candidate)
    return columns


def parse_csv(data: bytes, *, max_rows: int) -> ParsedFile:
    parsed = ParsedFile(file_format="csv")
    text = decode(data)
    if "\x00" in text:
        parsed.errors.append("The file holds NUL bytes: it is not a text CSV file.")
        return parsed
    # The delimiter is the candidate the header line uses most (column names rarely hold
    # one); csv.Sniffer guesses from data rows, where free text makes it unreliable.
    header_line = text.split("\n", 1)[0]
    delimiter = max(",;\t|", key=header_line.count)
    if not header_line.count(delimiter):
        delimiter = ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader, None)
    except csv.Error as exc:
        parsed.errors.append(f"The header row cannot be read: {exc}.")
        return parsed
    if not header or not any(cell.strip() for cell in header):
        parsed.errors.append("The file is empty: the first row must name the columns.")
        return parsed
    parsed.columns = _unique_columns(header)
    width = len(parsed.columns)
    bad_encoding = 0
    number = 0
    try:
        for cells in reader:
            if not any(cell.strip() for cell in cells):
                continue  # blank line
            number += 1
            if number > max_rows:
                parsed.errors.append(
                    f"The file has more than {max_rows:,} rows; only the first {max_rows:,} "
                    "were read."
                )
                break
            row = ParsedRow(
                number=number,
                data={
                    col: _printable(cell) for col, cell in zip(parsed.columns, cells, strict=False)
                },
            )
            if len(cells) != width:
                row.error = f"has {len(cells)} fields, expected {width}"
            else:
                for column, cell in zip(parsed.columns, cells, strict=True):
                    byte = _bad_bytes(cell)
                    if byte:
                        row.error = f"column {column!r} is not valid UTF-8 (byte {byte})"
                        bad_encoding += 1
                        break
            parsed.rows.append(row)
    except csv.Error as exc:
        parsed.errors.append(f"Reading stopped at line {reader.line_num}: {exc}.")
    if bad_encoding:
        parsed.errors.append(
            f"{bad_encoding} row(s) hold bytes that are not UTF-8; those rows are skipped. "
            "Save the file as UTF-8 to include them."
        )
    if not parsed.rows and not parsed.errors:
        parsed.errors.append("The file has a header but no data rows.")
    return parsed


def parse_jsonl(data: bytes, *, max_rows: int) -> ParsedFile:
    parsed = ParsedFile(file_format="jsonl")
    text = decode(data)
    if "\x00" in text:
        parsed.errors.append("The file holds NUL bytes: it is not a text JSONL file.")
        return parsed
    columns: dict[str, None] = {}
    number = 0
    for line in text.splitlines():
        if not line.strip():
            continue
        number += 1
        if number > max_rows:
            parsed.errors.append(
                f"The file has more than {max_rows:,} rows; only the first {max_rows:,} were read."
            )
            break
        row = ParsedRow(number=number, data={})
        byte = _bad_bytes(line)
        if byte:
            row.error = f"not valid UTF-8 (byte {byte})"
            parsed.rows.append(row)
            continue
        try:
            value = inputs.load_json(line, "The line")
        except inputs.InvalidInput as exc:
            # Not JSON, or nested too deep, or text that is not text (a "\ud800" escape).
            row.error = str(exc).removeprefix("The line ").removeprefix("is ").rstrip(".")
            parsed.rows.append(row)
            continue
        if not isinstance(value, dict):
            row.error = "each line must be a JSON object"
            parsed.rows.append(row)
            continue
        for key, item in value.items():
            columns.setdefault(str(key))
            if item is None:
                item = ""
            row.data[str(key)] = item if isinstance(item, str) else json.dumps(item)
        parsed.rows.append(row)
    parsed.columns = list(columns)
    if not parsed.rows and not parsed.errors:
        parsed.errors.append("The file has no JSON lines.")
    return parsed
