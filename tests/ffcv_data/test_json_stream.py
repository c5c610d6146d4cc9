"""json_stream: a file read member by member, in chunks as small as one character, gives what
json.load gives; a malformed or truncated file raises json.load's own message with the line and
column in the file, also where the error lies chunks after the start."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from ffcv_data import json_stream
from ffcv_data.errors import DataError

DOC = {
    "info": {"description": "a\nb \"quoted\" \\ é", "year": 2017, "nested": {"x": [1, [2, [3]]]}},
    "n": 1234567, "f": -1.5e-7, "t": True, "z": None, "s": "中文 \U0001F600",
    "images": [{"id": 9, "file_name": "é.jpg"}, {"id": 10, "file_name": "\U0001F600.jpg"}],
    "empty": [],
    "numbers": [0, -1, 12345678901234567890, 3.25, 1e10, -0.0, 2.5e-3],
    "mixed": [[], {}, "", "str", True, False, None, [1.5, {"k": [None]}]],
    "annotations": [{"id": k, "segmentation": [[k + 0.25] * 9], "bbox": [1, 2, 3, 4]} for k in range(6)],
    "last": 7,
}
TEXTS = {
    "one line": json.dumps(DOC, ensure_ascii=False),
    "pretty": json.dumps(DOC, indent=2),
    "compact": "\n " + json.dumps(DOC, separators=(",", ":")) + "\n\n",
}


def _read(path: Path, chunk_size: int = json_stream.CHUNK) -> list:
    """The members as (key, value) pairs, an array's elements taken into a list."""
    return [(k, list(v) if isinstance(v, Iterator) else v) for k, v in json_stream.members(path, chunk_size)]


def _json_load(path: Path):
    """json.load's reading: the members as pairs, or its error worded as json_stream words it."""
    try:
        with open(path) as f:
            return list(json.load(f).items())
    except json.JSONDecodeError as exc:
        return f"{path}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"


def _stream(path: Path, chunk_size: int):
    try:
        return _read(path, chunk_size)
    except DataError as exc:
        return str(exc)


@pytest.fixture
def write(tmp_path):
    def write(text: str) -> Path:
        path = tmp_path / "doc.json"
        path.write_text(text)
        return path

    return write


@pytest.mark.parametrize("style", TEXTS)
def test_any_chunk_size_reads_what_json_load_reads(write, style):
    path = write(TEXTS[style])
    expected = list(json.loads(TEXTS[style]).items())
    for chunk_size in (1, 2, 3, 7, 13, 64, json_stream.CHUNK):
        assert _read(path, chunk_size) == expected, chunk_size


def test_a_key_listed_twice_comes_twice(write):
    path = write('{"a": [1], "b": 2, "a": [3, 4]}')
    assert _read(path, 3) == [("a", [1]), ("b", 2), ("a", [3, 4])]


def test_elements_not_taken_are_skipped_and_still_checked(write):
    path = write('{"skipped": [{"x": 1}, [2], 3], "kept": [4, 5], "bad": [1, 2 3]}')
    stream = json_stream.members(path, 5)
    assert next(stream)[0] == "skipped"  # its elements are left alone
    key, elements = next(stream)
    assert (key, list(elements)) == ("kept", [4, 5])
    key, _ = next(stream)
    with pytest.raises(DataError) as err:
        next(stream)
    expected = f"{path}: malformed JSON at line 1 column 62: Expecting ',' delimiter"
    assert str(err.value) == _json_load(path) == expected


def test_an_error_chunks_after_the_start_is_located_in_the_file(write):
    """Line 105, column 15 of a pretty-printed file (of 194 lines), read a few characters at a time."""
    lines = json.dumps(DOC, indent=2).splitlines()
    assert lines[104] == '      "id": 2,'
    lines[104] = '      "id": 2 x,'
    path = write("\n".join(lines))
    expected = f"{path}: malformed JSON at line 105 column 15: Expecting ',' delimiter"
    assert _json_load(path) == expected
    for chunk_size in (7, 64, json_stream.CHUNK):
        with pytest.raises(DataError) as err:
            _read(path, chunk_size)
        assert str(err.value) == expected


@pytest.mark.parametrize("style", ["one line", "pretty"])
def test_every_truncation_is_reported_as_json_load_reports_it(write, style):
    text = TEXTS[style]
    for end in range(0, len(text), 3):
        path = write(text[:end])
        expected = _json_load(path)
        assert expected.startswith(f"{path}: malformed JSON at line ")
        for chunk_size in (3, 7, json_stream.CHUNK):
            assert _stream(path, chunk_size) == expected, (end, chunk_size)


@pytest.mark.parametrize("text", [
    '{"a": 1,}', '{"a": [1, 2,]}', '{"a" 1}', '{"a": [1 2]}', '{"a": 1 "b": 2}', "{,}", "{1: 2}",
    '{"a": 1} x', '{"a": 1}}', '\ufeff{"a": 1}', '{"a": tru}', '{"a": [1, -]}', '{"a": "\\x"}',
    '{"a": "line\nbreak"}', '{"a": [1.]}', '{"a": [1e]}', '{\r\n"a":\r\n [1,\r\n 2,,\r\n 3]}', "{", "",
    '{"a": [{"b": 1}, {"c" 2}]}', '{"a": "\\ud800\\u12"}', '{"a": [1, 2]', "[1, 2",
    '{"a": NaN, "b": -Infinit}',
])
def test_malformed_json_is_worded_as_json_load_words_it(write, text):
    path = write(text)
    expected = _json_load(path)
    assert expected.startswith(f"{path}: malformed JSON at line ")
    for chunk_size in (1, 2, 5, json_stream.CHUNK):
        assert _stream(path, chunk_size) == expected, chunk_size


@pytest.mark.parametrize("text", ["[1, 2]", "[]", '"x"', "3", "null", " [{\"a\": [1]}] "])
def test_a_document_that_is_not_an_object_is_refused_as_such(write, text):
    with pytest.raises(json_stream.NotAnObject):
        _read(write(text), 2)


def test_a_missing_file_raises_at_the_call(tmp_path):
    with pytest.raises(FileNotFoundError):
        json_stream.members(tmp_path / "missing.json")
