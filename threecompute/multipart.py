"""A streaming multipart/form-data parser, for uploads too big to hold in memory.

Tornado's own parser wants the whole body at once; uploads can be hundreds of megabytes. This
one is fed the body chunk by chunk as it arrives. Each file part's bytes go straight to a sink
opened for it (an `AtomicWriter`, say) and only a boundary's length of bytes is held back, in
case a delimiter is split between chunks, so memory stays O(chunk size) whatever the part size.
A sink is committed when its part ends; on any error every uncommitted sink is aborted, so a
failed upload leaves no half-written file. Small non-file fields are collected as text, at
most `max_fields` of them and `max_fields_bytes` in all, so memory stays bounded whatever the
body holds.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Protocol
from urllib.parse import unquote


class MultipartError(Exception):
    """The body is not well-formed multipart/form-data (or ended early), or is over a limit
    (`status` 413)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class FileSink(Protocol):
    def write(self, data: bytes) -> None: ...

    def commit(self) -> None: ...

    def abort(self) -> None: ...


class Discard:
    """Where the bytes of a file input left empty go (browsers send it with `filename=""`)."""

    def write(self, data: bytes) -> None:
        pass

    def commit(self) -> None:
        pass

    def abort(self) -> None:
        pass


# `; key=value` or `; key="quoted \"value\""`, as in Content-Type and Content-Disposition.
_PARAM = re.compile(r';\s*([^\s=;]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;]*))')
_QUOTED_ESCAPE = re.compile(r'\\(["\\])')
_EXTENDED_VALUE = re.compile(r"^(utf-8|iso-8859-1)'[^']*'(.*)$", re.IGNORECASE)
_BOUNDARY = re.compile(r"^[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]$")


def _parse_header_value(value: str) -> tuple[str, dict[str, str]]:
    """("type", {param: value}) from e.g. `form-data; name="f"`; param names lowercased."""
    main, _, rest = value.partition(";")
    params = {}
    for match in _PARAM.finditer(";" + rest):
        key, quoted, token = match.groups()
        params[key.lower()] = _QUOTED_ESCAPE.sub(r"\1", quoted) if quoted is not None else token.strip()
    return main.strip().lower(), params


def _filename(params: dict[str, str]) -> str | None:
    """The RFC 5987 `filename*` when it is one we can decode, else plain `filename`."""
    extended = _EXTENDED_VALUE.match(params.get("filename*", ""))
    if extended:
        charset, encoded = extended.groups()
        try:
            return unquote(encoded, encoding=charset, errors="strict")
        except UnicodeDecodeError:
            pass
    return params.get("filename")


def _body_ended(field: str, filename: str) -> FileSink:
    raise MultipartError("the body has ended")


class MultipartParser:
    """Feed it the body in chunks of any size; see `fields` and `files` once finished."""

    def __init__(self, boundary: bytes, open_file: Callable[[str, str], FileSink],
                 max_field_bytes: int = 64 * 1024, max_header_bytes: int = 16 * 1024,
                 max_fields: int = 64, max_fields_bytes: int = 256 * 1024) -> None:
        self._delimiter = b"\r\n--" + boundary
        self._open_file = open_file
        self._max_field_bytes = max_field_bytes
        self._max_fields = max_fields
        self._max_fields_bytes = max_fields_bytes
        self._fields_count = 0
        self._fields_bytes = 0
        self._max_header_bytes = max_header_bytes
        # The first delimiter has no CRLF before it; supplying one lets a single search find all.
        self._buffer = bytearray(b"\r\n")
        # Steps are kept unbound: a bound method held by its own object would make every
        # parser a reference cycle, freed only by the collector instead of with its upload.
        self._step: Callable[[MultipartParser], bool] = MultipartParser._preamble
        self._name = ""
        self._filename: str | None = None
        self._sink: FileSink | None = None
        self._field = bytearray()
        self.fields: dict[str, list[str]] = {}
        self.files: list[tuple[str, str]] = []

    @staticmethod
    def boundary_from_content_type(content_type: str) -> bytes:
        media, params = _parse_header_value(content_type)
        if media != "multipart/form-data":
            raise MultipartError(f"not multipart/form-data: {media or 'no content type'}")
        boundary = params.get("boundary", "")
        if not _BOUNDARY.match(boundary):
            raise MultipartError("missing or malformed boundary")
        return boundary.encode("ascii")

    def feed(self, chunk: bytes) -> None:
        if self._step is MultipartParser._failed:
            raise MultipartError("the upload already failed")
        self._buffer += chunk
        try:
            while self._step(self):
                pass
        except BaseException:
            self.abort()
            raise

    def finish(self) -> None:
        if self._step is not MultipartParser._epilogue:
            self.abort()
            raise MultipartError("the body ended before the closing boundary")
        self._open_file = _body_ended  # the owner's callback, held no longer than needed

    def abort(self) -> None:
        sink, self._sink = self._sink, None
        self._open_file = _body_ended
        self._step = MultipartParser._failed
        self._buffer.clear()
        if sink is not None:
            sink.abort()

    # Each step consumes what it can from the buffer and returns whether to run the next
    # step now (True) or wait for more bytes (False).

    def _preamble(self) -> bool:
        at = self._buffer.find(self._delimiter)
        if at < 0:
            del self._buffer[: max(0, len(self._buffer) - len(self._delimiter) + 1)]
            return False
        del self._buffer[: at + len(self._delimiter)]
        self._step = MultipartParser._after_delimiter
        return True

    def _after_delimiter(self) -> bool:
        if self._buffer.startswith(b"--"):
            self._buffer.clear()
            self._step = MultipartParser._epilogue
            return False
        line_end = self._buffer.find(b"\r\n")
        if line_end < 0:
            if len(self._buffer) > self._max_header_bytes:
                raise MultipartError("malformed boundary line")
            return False
        if self._buffer[:line_end].strip(b" \t"):  # only transport padding may follow a boundary
            raise MultipartError("malformed boundary line")
        # The CRLF stays, so that a part without headers still ends at the first CRLFCRLF.
        del self._buffer[:line_end]
        self._step = MultipartParser._headers
        return True

    def _headers(self) -> bool:
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > self._max_header_bytes:
                raise MultipartError("part headers too long")
            return False
        block = self._buffer[2:end].decode("utf-8", "replace")
        del self._buffer[: end + 4]
        self._start_part(block)
        self._step = MultipartParser._body
        return True

    def _body(self) -> bool:
        at = self._buffer.find(self._delimiter)
        if at < 0:
            # Everything but a tail that could be the start of a split delimiter.
            keep = len(self._delimiter) - 1
            if len(self._buffer) > keep:
                self._emit(bytes(self._buffer[:-keep]))
                del self._buffer[:-keep]
            return False
        self._emit(bytes(self._buffer[:at]))
        del self._buffer[: at + len(self._delimiter)]
        self._end_part()
        self._step = MultipartParser._after_delimiter
        return True

    def _epilogue(self) -> bool:
        self._buffer.clear()
        return False

    def _failed(self) -> bool:
        return False

    def _start_part(self, header_block: str) -> None:
        disposition = ""
        for line in header_block.split("\r\n"):
            key, _, value = line.partition(":")
            if key.strip().lower() == "content-disposition":
                disposition = value
        kind, params = _parse_header_value(disposition)
        if kind != "form-data" or "name" not in params:
            raise MultipartError("a part lacks Content-Disposition: form-data with a name")
        self._name, self._filename = params["name"], _filename(params)
        if not self._filename:  # a text field, or an empty file input: both count as fields
            self._fields_count += 1
            if self._fields_count > self._max_fields:
                raise MultipartError(f"more than {self._max_fields} form fields", 413)
        if self._filename is not None:
            self._sink = self._open_file(self._name, self._filename) if self._filename else Discard()

    def _emit(self, data: bytes) -> None:
        if self._sink is not None:
            self._sink.write(data)
            return
        self._field += data
        self._fields_bytes += len(data)
        if len(self._field) > self._max_field_bytes:
            raise MultipartError(f"form field {self._name!r} is longer than {self._max_field_bytes} bytes", 413)
        if self._fields_bytes > self._max_fields_bytes:
            raise MultipartError(f"form fields larger than {self._max_fields_bytes} bytes in all", 413)

    def _end_part(self) -> None:
        if self._sink is not None:
            self._sink.commit()
            self._sink = None
            if self._filename:
                self.files.append((self._name, self._filename))
            return
        try:
            value = self._field.decode("utf-8")
        except UnicodeDecodeError:
            raise MultipartError(f"form field {self._name!r} is not UTF-8") from None
        self.fields.setdefault(self._name, []).append(value)
        self._field.clear()
