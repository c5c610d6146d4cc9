"""Read a JSON file whose top level is an object member by member, without holding the whole file.

A COCO-format `instances` file at OpenImages size (9M images) is ~25 GB as Python objects: `json.load`
cannot hold it. `members(path)` reads the text in chunks and gives
the top-level members in file order: an array member as an iterator over its elements, each decoded on
its own (by the standard library's decoder) and dropped once the reader has taken what it keeps.

Errors read as `json.load`'s would: the same message, with the line and column in the file, raised as
`DataError`. A document that is valid JSON but not an object raises `NotAnObject`, whose caller says
what it expected instead.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

from ffcv_data.errors import DataError

CHUNK = 8 << 20  # characters read at a time
_WHITESPACE = re.compile(r"[ \t\n\r]*")  # JSON's whitespace (str.isspace would take more)
# A value cut by the end of the buffer fails, or a cut number ends ("1" of "1e+5"), at most this close
# to it ("-Infinit": 8 characters); an unterminated string fails at its start, however long it is.
_CUT = 16


class NotAnObject(DataError):
    """The file is valid JSON, but its top level is not an object."""


def members(path: str | Path, chunk_size: int = CHUNK) -> Iterator[tuple[str, object]]:
    """(key, value) of each member of the object in `path`, in file order (a key listed twice comes
    twice: the later one is what `json.load` keeps). An array's value is an iterator over its
    elements, read as they are taken; elements not taken before the next member are read and dropped.
    Any other value comes whole. Raises FileNotFoundError here, at the call."""
    file = open(path)
    return _Stream(file, Path(path), chunk_size).members()


class _Stream:
    """`buf[pos:]` is the text not consumed yet; what lies before it in the file is known only by
    its count of lines and the length of its last line (for the line and column of an error)."""

    def __init__(self, file, path: Path, chunk_size: int):
        self.file, self.path, self.chunk_size = file, path, chunk_size
        self.buf, self.pos, self.eof = "", 0, False
        self.lines, self.column = 0, 0  # newlines before buf[0]; characters after the last one
        self.raw_decode = json.JSONDecoder().raw_decode

    def members(self) -> Iterator[tuple[str, object]]:
        with self.file:
            self._more()
            if self.buf.startswith("\ufeff"):  # json.loads refuses it too, before anything else
                raise self._malformed("Unexpected UTF-8 BOM (decode using utf-8-sig)", 0)
            self.pos = self._skip(0)
            if not self.buf.startswith("{", self.pos):
                self._not_an_object()
            i = self._skip(self.pos + 1)
            if self.buf.startswith("}", i):
                self.pos = i + 1
            else:
                yield from self._members(i)
            self._end()

    def _members(self, i: int) -> Iterator[tuple[str, object]]:
        """The members from buf[i], the first non-blank character after '{', to the closing '}'."""
        while True:
            if not self.buf.startswith('"', i):  # a key, after '{' (where '}' was taken) or ','
                raise self._fail("" if self.buf.startswith("{", self.pos) else '{"k":null', i)
            self.pos = i
            key = self._decode()
            i = self._skip(self.pos)
            if not self.buf.startswith(":", i):
                raise self._fail('{"k"', i)
            i = self._skip(i + 1)
            if self.buf.startswith("[", i):
                self.pos = i
                elements = self._elements()
                yield key, elements
                for _ in elements:  # what the caller did not take is still checked
                    pass
            else:
                self.pos = i
                yield key, self._decode()
            i = self._skip(self.pos)
            if self.buf.startswith("}", i):
                self.pos = i + 1
                return
            if not self.buf.startswith(",", i):
                raise self._fail('{"k":null', i)
            self.pos = i
            i = self._skip(i + 1)

    def _elements(self) -> Iterator[object]:
        """The elements of the array whose '[' is at buf[pos]; leaves pos after its ']'."""
        i = self._skip(self.pos + 1)
        if self.buf.startswith("]", i):
            self.pos = i + 1
            return
        while True:
            self.pos = i
            yield self._decode()
            i = self._skip(self.pos)
            if self.buf.startswith("]", i):
                self.pos = i + 1
                return
            if not self.buf.startswith(",", i):
                raise self._fail("[null", i)
            self.pos = i
            i = self._skip(i + 1)
            if self.buf.startswith("]", i):  # a trailing comma
                raise self._fail("[null", i)

    def _decode(self) -> object:
        """The value at buf[pos] (not blank); leaves pos after it. A value cut by the end of the
        buffer (an error near it, or a value ending near it: a number that may go on, "1" of "1.5")
        is decoded again with more text."""
        while True:
            try:
                value, end = self.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as exc:
                cut = exc.pos >= len(self.buf) - _CUT or exc.msg.startswith("Unterminated string")
                if self.eof or not cut:
                    raise self._malformed(exc.msg, exc.pos) from None
                self._more()
                continue
            if end < len(self.buf) - _CUT or self.eof:
                self.pos = end
                return value
            self._more()

    def _skip(self, i: int) -> int:
        """The position of the first non-blank character from buf[i] (len(buf) at the end of the
        file), reading more text while the blanks reach the end of the buffer."""
        while True:
            j = _WHITESPACE.match(self.buf, i).end()
            if j < len(self.buf) or self.eof:
                return j
            i = j - self._more()

    def _more(self) -> int:
        """Drop buf[:pos] and read at least as much text again as is left (an element longer than
        a chunk is decoded again a few times, not once per chunk). Returns how many characters
        were dropped: positions in buf move back by that much. Sets eof at the end of the file."""
        chunk = self.file.read(max(self.chunk_size, len(self.buf) - self.pos))
        if not chunk:
            self.eof = True
            return 0
        dropped = self.pos
        newlines = self.buf.count("\n", 0, dropped)
        if newlines:
            self.lines += newlines
            self.column = dropped - self.buf.rfind("\n", 0, dropped) - 1
        else:
            self.column += dropped
        self.buf = self.buf[dropped:] + chunk
        self.pos = 0
        return dropped

    def _end(self) -> None:
        """Only blanks may follow the top-level value."""
        i = self._skip(self.pos)
        if i < len(self.buf):
            raise self._malformed("Extra data", i)

    def _not_an_object(self) -> None:
        """Read the rest as json.load would (a malformed file is reported as such), then refuse it."""
        if self.buf.startswith("[", self.pos):
            for _ in self._elements():
                pass
        else:
            self._decode()
        self._end()
        raise NotAnObject(f"{self.path}: the top level is not a JSON object")

    def _fail(self, standin: str, i: int) -> DataError:
        """json's own error for the structure from buf[pos] to buf[i], the character that does
        not fit there (or the end of the file): `standin`, text that leaves json's decoder where the
        reader is (inside an object after a value, ...), followed by that text, fails as the file does."""
        text = standin + self.buf[self.pos:i + 1]
        try:
            self.raw_decode(text)
        except json.JSONDecodeError as exc:
            return self._malformed(exc.msg, self.pos + exc.pos - len(standin))
        raise AssertionError(f"json_stream: {text!r} did not fail")  # the reader's own bug

    def _malformed(self, msg: str, i: int) -> DataError:
        """The error at buf[i], located in the file as json.load would (line and column from 1)."""
        newlines = self.buf.count("\n", 0, i)
        if newlines:
            line, column = self.lines + newlines + 1, i - self.buf.rfind("\n", 0, i)
        else:
            line, column = self.lines + 1, self.column + i + 1
        return DataError(f"{self.path}: malformed JSON at line {line} column {column}: {msg}")
