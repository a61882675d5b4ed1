"""Reading uploaded batch files: encodings, quoting, missing fields, JSONL, size."""

from __future__ import annotations

import codecs

from batches.parsing import parse_csv, parse_jsonl, parse_upload


def test_quoted_newlines_and_commas_stay_inside_their_field():
    data = b'id,text\n1,"line one\nline two, with a comma"\n2,"say ""hi"""\n'
    parsed = parse_csv(data, max_rows=100)
    assert parsed.errors == []
    assert parsed.columns == ["id", "text"]
    assert [r.data["text"] for r in parsed.rows] == [
        "line one\nline two, with a comma",
        'say "hi"',
    ]
    assert [r.number for r in parsed.rows] == [1, 2]


def test_row_with_bad_bytes_is_reported_and_the_other_rows_proceed():
    data = "id,text\n1,caf\u00e9\n".encode() + b"2,caf\xe9 latin-1\n" + b"3,plain\n"
    parsed = parse_csv(data, max_rows=100)
    errors = {r.number: r.error for r in parsed.rows}
    assert errors[1] == ""
    assert errors[3] == ""
    assert "not valid UTF-8 (byte 0xe9)" in errors[2]
    assert parsed.rows[0].data["text"] == "caf\u00e9"
    assert "\ufffd" in parsed.rows[1].data["text"]  # stored printable, never as a surrogate
    assert any("not UTF-8" in e for e in parsed.errors)


def test_utf8_bom_and_utf16_files_are_decoded():
    parsed = parse_csv(codecs.BOM_UTF8 + b"text\nhello\n", max_rows=10)
    assert parsed.columns == ["text"]
    utf16 = "text\nh\u00e9llo\n".encode("utf-16")
    assert parse_csv(utf16, max_rows=10).rows[0].data["text"] == "h\u00e9llo"


def test_rows_with_missing_or_extra_fields_are_invalid():
    parsed = parse_csv(b"a,b\n1,2\n3\n4,5,6\n", max_rows=10)
    assert [r.error for r in parsed.rows] == [
        "",
        "has 1 fields, expected 2",
        "has 3 fields, expected 2",
    ]


def test_semicolon_delimited_file_is_recognised_from_its_header():
    parsed = parse_csv(b"product;review\nKettle;Loud, but fast\n", max_rows=10)
    assert parsed.rows[0].data == {"product": "Kettle", "review": "Loud, but fast"}


def test_binary_and_empty_files_are_file_errors():
    assert parse_csv(b"\x00\x01\x02binary", max_rows=10).errors
    assert "empty" in parse_csv(b"", max_rows=10).errors[0]
    assert "no data rows" in parse_csv(b"a,b\n", max_rows=10).errors[0]


def test_more_rows_than_the_limit_are_cut_with_a_file_error():
    data = b"text\n" + b"".join(b"row %d\n" % i for i in range(20))
    parsed = parse_csv(data, max_rows=5)
    assert len(parsed.rows) == 5
    assert "more than 5 rows" in parsed.errors[0]


def test_jsonl_rows_with_bad_lines_reported():
    data = b'{"text": "a", "n": 1}\nnot json\n[1, 2]\n{"text": "b", "extra": {"x": 1}}\n'
    parsed = parse_jsonl(data, max_rows=10)
    assert parsed.columns == ["text", "n", "extra"]
    errors = [r.error for r in parsed.rows]
    assert errors[0] == ""
    assert errors[3] == ""
    assert errors[1].startswith("not valid JSON")
    assert errors[2] == "each line must be a JSON object"
    assert parsed.rows[0].data == {"text": "a", "n": "1"}
    assert parsed.rows[3].data["extra"] == '{"x": 1}'


def test_upload_format_is_chosen_by_file_name():
    assert parse_upload("rows.jsonl", b'{"a": "1"}\n', max_rows=10).file_format == "jsonl"
    assert parse_upload("rows.csv", b"a\n1\n", max_rows=10).file_format == "csv"


def test_duplicate_and_blank_column_names_are_made_unique():
    parsed = parse_csv(b"text,text,,text\na,b,c,d\n", max_rows=10)
    assert parsed.columns == ["text", "text_2", "column_3", "text_3"]
    assert parsed.rows[0].data == {"text": "a", "text_2": "b", "column_3": "c", "text_3": "d"}


def test_jsonl_bad_bytes_and_too_many_lines_are_reported():
    data = b'{"text": "a"}\n{"text": "caf\xe9"}\n' + b"".join(
        b'{"text": "%d"}\n' % i for i in range(5)
    )
    parsed = parse_jsonl(data, max_rows=4)
    assert len(parsed.rows) == 4
    assert parsed.rows[1].error == "not valid UTF-8 (byte 0xe9)"
    assert "more than 4 rows" in parsed.errors[0]


def test_a_csv_the_reader_chokes_on_keeps_the_rows_read_before():
    # A quoted field longer than the csv module's limit stops the reader mid-file.
    data = b'text\nfirst\n"' + b"x" * 200_000 + b'"\nlast\n'
    parsed = parse_csv(data, max_rows=10)
    assert [r.data["text"] for r in parsed.rows] == ["first"]
    assert parsed.errors[0].startswith("Reading stopped at line")
