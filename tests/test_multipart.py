"""The streaming multipart parser: any chunking, boundary look-alikes in content, errors that
leave no half-written file, and memory that stays bounded for a large part."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from threecompute.multipart import MultipartError, MultipartParser
from threecompute.workspace import Workspace, Workspaces

BOUNDARY = b"----WebKitFormBoundaryx8AbC1dEf"
# Content that looks like the boundary without being a delimiter (no CRLF before it, or cut short).
TRICKY = (b"--" + BOUNDARY + b" not at line start\r\n--" + BOUNDARY[:-1] + b"\r\n-" + BOUNDARY
          + b"\r\r\n\n--" + BOUNDARY[:5] + b"\r\n" + b"\r\n\r\n--")


def part(name: str, content: bytes, filename: str | None = None, extra: str = "") -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
    headers = f"Content-Disposition: {disposition}\r\n{extra}"
    if filename is not None:
        headers += "Content-Type: application/octet-stream\r\n"
    return b"--" + BOUNDARY + b"\r\n" + headers.encode() + b"\r\n" + content + b"\r\n"


def body(*parts: bytes, preamble: bytes = b"", epilogue: bytes = b"") -> bytes:
    return preamble + b"".join(parts) + b"--" + BOUNDARY + b"--\r\n" + epilogue


class MemorySink:
    def __init__(self, store: dict[str, bytes], filename: str) -> None:
        self.store, self.filename, self.data = store, filename, bytearray()
        self.state = "open"

    def write(self, data: bytes) -> None:
        assert self.state == "open", f"write after {self.state}"
        self.data += data

    def commit(self) -> None:
        self.state = "committed"
        self.store[self.filename] = bytes(self.data)

    def abort(self) -> None:
        self.state = "aborted"


def memory_parser() -> tuple[MultipartParser, dict[str, bytes], list[MemorySink]]:
    store: dict[str, bytes] = {}
    sinks: list[MemorySink] = []

    def open_file(field: str, filename: str) -> MemorySink:
        sinks.append(MemorySink(store, f"{field}:{filename}"))
        return sinks[-1]

    return MultipartParser(BOUNDARY, open_file), store, sinks


def feed_in_chunks(parser: MultipartParser, data: bytes, size: int) -> None:
    for start in range(0, len(data), size):
        parser.feed(data[start:start + size])


def workspace_parser(ws: Workspace) -> MultipartParser:
    return MultipartParser(BOUNDARY, lambda field, filename: ws.open_writer(filename, make_parents=True))


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspaces(tmp_path / "workspaces", list_ttl=0).for_user("u")


SAMPLE_FILES = {
    "hello.txt": b"hello\r\nworld\r\n",
    "tricky.bin": TRICKY + os.urandom(3000) + TRICKY,
    "empty.txt": b"",
    "crlf_end.txt": b"ends in CRLF\r\n\r\n",
}


def sample_body() -> bytes:
    return body(
        part("files", SAMPLE_FILES["hello.txt"], "hello.txt"),
        part("move-into", "dossier \u00e9t\u00e9".encode()),
        part("files", SAMPLE_FILES["tricky.bin"], "tricky.bin"),
        part("files", SAMPLE_FILES["empty.txt"], "empty.txt"),
        part("move-into", b"second"),
        part("files", SAMPLE_FILES["crlf_end.txt"], "crlf_end.txt"),
        preamble=b"This is the preamble.\r\n--" + BOUNDARY[:-2] + b"\r\n",
        epilogue=b"and an epilogue\r\n",
    )


@pytest.mark.parametrize("size", [1, 7, 1000, None])
def test_files_and_fields_in_any_chunking(size: int | None) -> None:
    parser, store, sinks = memory_parser()
    data = sample_body()
    feed_in_chunks(parser, data, size or len(data))
    parser.finish()
    assert store == {f"files:{name}": content for name, content in SAMPLE_FILES.items()}, {
        k: v[:60] for k, v in store.items()}
    assert parser.files == [("files", name) for name in SAMPLE_FILES]
    assert parser.fields == {"move-into": ["dossier \u00e9t\u00e9", "second"]}
    assert [sink.state for sink in sinks] == ["committed"] * 4


@pytest.mark.parametrize("size", [1, 7, 1000, None])
def test_files_stream_into_the_workspace(ws: Workspace, size: int | None) -> None:
    parser = workspace_parser(ws)
    data = body(part("files", SAMPLE_FILES["tricky.bin"], "up/tricky.bin"), part("files", b"a", "a.txt"))
    feed_in_chunks(parser, data, size or len(data))
    parser.finish()
    assert (ws.root / "up" / "tricky.bin").read_bytes() == SAMPLE_FILES["tricky.bin"]
    assert ws.list_files() == ["a.txt", "up/", "up/tricky.bin"]


@pytest.mark.parametrize("cut", [10, 200, 400, -60, -3])
def test_truncated_body_is_an_error_and_leaves_no_partial_file(ws: Workspace, cut: int) -> None:
    first = part("files", b"first file " * 20, "first.txt")
    data = body(first, part("files", b"second file " * 20, "second.txt"))
    parser = workspace_parser(ws)
    parser.feed(data[:cut])
    with pytest.raises(MultipartError):
        parser.finish()
    left = sorted(os.listdir(ws.root))
    # A part whose closing delimiter arrived was committed whole; nothing else remains.
    expected = ["first.txt"] if cut < 0 or cut > len(first) + 4 else []
    if cut == -3:  # only the closing "-\r\n" is missing: the second part had ended
        expected.append("second.txt")
    assert left == expected, f"cut at {cut}: {left}"
    if left:
        assert (ws.root / "first.txt").read_bytes() == b"first file " * 20


def test_feeding_after_a_failure_is_refused() -> None:
    parser, _, sinks = memory_parser()
    parser.feed(part("files", b"x", "a.txt"))
    parser.abort()
    with pytest.raises(MultipartError):
        parser.feed(b"more")
    assert [sink.state for sink in sinks] == ["aborted"]


@pytest.mark.parametrize("bad", [
    b"--" + BOUNDARY + b"\r\nContent-Disposition: attachment; name=\"x\"\r\n\r\nx\r\n--" + BOUNDARY + b"--",
    b"--" + BOUNDARY + b"\r\nContent-Type: text/plain\r\n\r\nno disposition\r\n--" + BOUNDARY + b"--",
    b"--" + BOUNDARY + b"\r\n\r\nno headers at all\r\n--" + BOUNDARY + b"--",
    b"--" + BOUNDARY + b"garbage after the boundary\r\n",
    b"--" + BOUNDARY + b"\r\nX-Long: " + b"h" * 20000,
    part("field", b"x" * (64 * 1024 + 1)) + b"--" + BOUNDARY + b"--",
    part("field", b"\xff\xfe not utf-8") + b"--" + BOUNDARY + b"--",
])
def test_malformed_bodies(bad: bytes) -> None:
    parser, store, sinks = memory_parser()
    with pytest.raises(MultipartError) as caught:
        feed_in_chunks(parser, bad, 1000)
        parser.finish()
    assert store == {}, f"committed despite {caught.value}"


def test_failing_write_aborts_the_open_sink(ws: Workspace) -> None:
    class DiskFillsUp:
        def __init__(self, filename: str) -> None:
            self.writer, self.filename = ws.open_writer(filename), filename

        def write(self, data: bytes) -> None:
            if self.filename == "big.txt":
                raise OSError(28, "No space left on device")
            self.writer.write(data)

        def commit(self) -> None:
            self.writer.commit()

        def abort(self) -> None:
            self.writer.abort()

    parser = MultipartParser(BOUNDARY, lambda field, filename: DiskFillsUp(filename))
    data = body(part("files", b"complete", "ok.txt"), part("files", b"too much " * 100, "big.txt"))
    with pytest.raises(OSError, match="No space"):
        feed_in_chunks(parser, data, 100)
    assert os.listdir(ws.root) == ["ok.txt"], "a temporary file was left behind"
    assert parser.files == [("files", "ok.txt")]


def test_sink_that_refuses_aborts_nothing_committed(ws: Workspace) -> None:
    parser = workspace_parser(ws)
    data = body(part("files", b"fine", "fine.txt"), part("files", b"evil", "../evil.txt"))
    with pytest.raises(Exception, match="'..'"):
        parser.feed(data)
    assert os.listdir(ws.root) == ["fine.txt"]


def test_content_disposition_forms() -> None:
    parser, store, _ = memory_parser()
    data = body(
        part("files", b"1", 'say \\"hi\\".txt'),
        part("files", b"2", "dir/sub/path.txt"),
        b"--" + BOUNDARY + b"\r\ncontent-disposition: FORM-DATA; name=files; filename=plain.txt; "
        b"filename*=UTF-8''%E2%82%AC%20rates.txt\r\n\r\n3\r\n",
        b"--" + BOUNDARY + b"\r\nContent-Disposition: form-data; name=\"files\"; filename=\"\"\r\n\r\n\r\n",
        b"--" + BOUNDARY + b" \t\r\nContent-Disposition: form-data; name=\"files\"; filename=\"pad.txt\"\r\n\r\n4\r\n",
    )
    feed_in_chunks(parser, data, 5)
    parser.finish()
    assert store == {'files:say "hi".txt': b"1", "files:dir/sub/path.txt": b"2", "files:\u20ac rates.txt": b"3",
                     "files:pad.txt": b"4"}, store
    assert parser.files == [("files", 'say "hi".txt'), ("files", "dir/sub/path.txt"), ("files", "\u20ac rates.txt"),
                            ("files", "pad.txt")]


@pytest.mark.parametrize(("content_type", "expected"), [
    ("multipart/form-data; boundary=" + BOUNDARY.decode(), BOUNDARY),
    ('Multipart/Form-Data; charset=utf-8; boundary="quoted boundary"', b"quoted boundary"),
])
def test_boundary_from_content_type(content_type: str, expected: bytes) -> None:
    assert MultipartParser.boundary_from_content_type(content_type) == expected


@pytest.mark.parametrize("content_type", [
    "", "application/json", "multipart/form-data", "multipart/form-data; boundary=",
    "multipart/mixed; boundary=abc", "multipart/form-data; boundary=" + "x" * 71,
    "multipart/form-data; boundary=\"bad\x00\"", "multipart/form-data; boundary=\"trailing \"",
])
def test_bad_content_types(content_type: str) -> None:
    with pytest.raises(MultipartError):
        MultipartParser.boundary_from_content_type(content_type)


class CountingSink:
    """Keeps only a hash and a count, so the test itself holds no copy of the part."""

    def __init__(self) -> None:
        self.hash, self.size, self.committed = hashlib.sha256(), 0, False

    def write(self, data: bytes) -> None:
        self.hash.update(data)
        self.size += len(data)

    def commit(self) -> None:
        self.committed = True

    def abort(self) -> None:
        pass


def test_large_part_streams_with_a_bounded_buffer() -> None:
    chunk_size, total = 64 * 1024, 50 * 1024 * 1024
    block = (TRICKY + bytes(range(256)) * 8) * 32
    expected = hashlib.sha256()
    sink = CountingSink()
    parser = MultipartParser(BOUNDARY, lambda field, filename: sink)
    head = b"--" + BOUNDARY + b"\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big\"\r\n\r\n"
    pending = head
    largest_buffer = 0
    sent = 0
    while sent < total:
        piece = block[: min(len(block), total - sent)]
        expected.update(piece)
        sent += len(piece)
        pending += piece
        while len(pending) >= chunk_size:
            parser.feed(pending[:chunk_size])
            pending = pending[chunk_size:]
            largest_buffer = max(largest_buffer, len(parser._buffer))
            assert sink.size >= sent - len(pending) - len(head) - 2 * len(BOUNDARY) - 8, "bytes are held back"
    parser.feed(pending + b"\r\n--" + BOUNDARY + b"--\r\n")
    parser.finish()
    assert (sink.size, sink.committed) == (total, True)
    assert sink.hash.hexdigest() == expected.hexdigest()
    assert largest_buffer <= len(BOUNDARY) + 8, f"the parser held {largest_buffer} bytes between chunks"
