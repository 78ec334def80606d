"""CSV records that span lines (quoted newlines), their line numbers, and bad
input that stays on the record it is in: bytes not valid in the encoding, a
file cut off inside a quote, a wrong number of fields."""

import pytest

from pipeline.data.tabular import ColumnMapping, SourceError, read_table

MAPPING = ColumnMapping(text="text", label="label", id="id")


def _read(tmp_path, data: bytes, name: str = "in.csv"):
    path = tmp_path / name
    path.write_bytes(data)
    return read_table(str(path), MAPPING)


def _errors(frame) -> list:
    return [e if isinstance(e, str) else None for e in frame["error"]]  # pandas may hold None as NaN


@pytest.mark.parametrize("eol", [b"\n", b"\r\n"])
def test_a_quoted_newline_keeps_the_record_whole(tmp_path, eol):
    data = eol.join([
        b"id,text,label",
        b'1,"Profit rose.' , b'Shares jumped.",positive',
        b"2,Flat quarter,neutral",
        b'3,"three', b"line", b'story",negative',
        b"4,Last one,neutral",
    ]) + eol
    frame = _read(tmp_path, data)
    assert frame["error"].isna().all()
    assert frame["id"].tolist() == ["1", "2", "3", "4"]
    assert frame["line"].tolist() == [2, 4, 5, 8]
    nl = eol.decode()
    assert frame["text"].tolist() == [f"Profit rose.{nl}Shares jumped.", "Flat quarter", f"three{nl}line{nl}story", "Last one"]


def test_blank_lines_are_skipped_and_counted(tmp_path):
    frame = _read(tmp_path, b'id,text,label\n\n1,"a\n\nb",positive\n   \n2,c,neutral\n')
    assert frame["line"].tolist() == [3, 7]
    assert frame["text"].tolist() == ["a\n\nb", "c"]


def test_bad_bytes_inside_a_multi_line_record_only_mark_that_record(tmp_path):
    data = b'id,text,label\n1,"good\nstory",positive\n2,"bad\nby\xfft\xe9",negative\n3,fine,neutral\n4,caf\xc3\xa9 \xff,neutral\n'
    frame = _read(tmp_path, data)
    assert frame["line"].tolist() == [2, 4, 6, 7]
    assert _errors(frame) == [
        None, "bytes not valid utf-8 at line 5, column 3", None,
        "bytes not valid utf-8 at column 9",  # counted in bytes: é is two
    ]
    assert frame["text"].tolist()[::2] == ["good\nstory", "fine"]
    assert frame["text"].isna().tolist() == [False, True, False, True]


def test_a_file_cut_off_inside_a_quote_keeps_the_rows_before(tmp_path):
    frame = _read(tmp_path, b'id,text,label\n1,first,positive\n2,second,neutral\n3,"cut off\nin the mid')
    assert frame["text"].tolist()[:2] == ["first", "second"]
    assert frame["line"].tolist() == [2, 3, 4]
    assert _errors(frame) == [None, None, "unterminated quoted field starting at line 4 (truncated file?)"]


def test_wrong_field_counts_and_malformed_quotes_are_row_errors(tmp_path):
    frame = _read(tmp_path, b'id,text,label\n1,"two\nlines"\n2,ok,neutral\n3,"x"y,neutral\n4,extra,neutral,field\n5,"last",positive\n')
    assert frame["line"].tolist() == [2, 4, 5, 6, 7]
    assert _errors(frame) == [
        "2 fields, the header has 3", None, "malformed CSV: ',' expected after '\"'", "4 fields, the header has 3", None,
    ]
    assert frame["text"].tolist()[1::3] == ["ok", "last"]


def test_whole_file_problems_raise_source_error_naming_the_file(tmp_path):
    with pytest.raises(SourceError, match=r"head\.csv: the header line is not valid utf-8"):
        _read(tmp_path, b"id,te\xffxt,label\n1,a,positive\n", "head.csv")
    with pytest.raises(SourceError, match=r"cols\.csv: no column 'label'"):
        _read(tmp_path, b'id,text\n1,"a\nb"\n', "cols.csv")
    with pytest.raises(SourceError, match=r"quote\.csv: unreadable header: unterminated quoted field"):
        _read(tmp_path, b'id,"text,label\n1,a,positive\n', "quote.csv")


def test_empty_and_header_only_files(tmp_path):
    assert _read(tmp_path, b"", "empty.csv").empty
    assert _read(tmp_path, b"id,text,label\r\n", "header.csv").empty


def test_other_encodings_still_decode(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes('id,text,label\n1,"Caf\xe9\nzw\xf6lf",positive\n'.encode("latin-1"))
    frame = read_table(str(path), MAPPING, encoding="latin-1")
    assert frame["text"].tolist() == ["Café\nzwölf"] and frame["error"].isna().all()
