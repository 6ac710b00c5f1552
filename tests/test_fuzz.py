"""Property-based tests (hypothesis) of what clients send: terminal frames, multipart bodies,
workspace paths and tab lists. Arbitrary input raises only the parser's own error type,
never writes outside the workspace, and never leaves a temporary file behind.

Each property is bounded (`max_examples`, no deadline: a shared machine is slow at times),
so the whole file runs in a few seconds."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from threecompute.handlers.auth import parse_tabs
from threecompute.handlers.base import HTTPError, json_object
from threecompute.multipart import MultipartError, MultipartParser
from threecompute.terminal_frames import FrameError, InputRouter, parse_event, parse_frame
from threecompute.uploads import UploadBatch
from threecompute.workspace import Workspace, WorkspaceError, Workspaces

# No example database: nothing is written into the worktree, and a run is what it says.
FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
FILE_FUZZ = settings(FUZZ, max_examples=300)  # cheap examples that touch the disk: more of them

# JSON values of any shape, a little bigger than what clients send.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=20,
)
# Path-like strings: made of the pieces that matter to path resolution, or anything at all.
path_pieces = st.sampled_from(["", ".", "..", "/", "//", "a", "b", "sub", "out", "loop", "link", "f.txt",
                               "\\", "\x00", "é", "\ud800", "x" * 300])
paths = st.lists(path_pieces, max_size=6).map("/".join) | st.text(max_size=40)


# -- terminal frames ----------------------------------------------------------------------


class RecordingTerminal:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def write(self, text: str) -> None:
        assert isinstance(text, str)
        self.calls.append(("write", text))

    def resize(self, rows: int, cols: int) -> None:
        assert type(rows) is int and type(cols) is int and 1 <= rows <= 1000 and 1 <= cols <= 1000
        self.calls.append(("resize", rows, cols))


def route(frames: list[str | bytes]) -> tuple[RecordingTerminal, list[str]]:
    """Frames through the parser and the router, as a transport does."""
    errors: list[str] = []
    router, terminal = InputRouter(), RecordingTerminal()
    for i, frame in enumerate(frames):
        if i == len(frames) // 2:
            errors += router.attach(terminal)  # some frames arrive before the terminal is ready
        try:
            problem = router.receive(parse_frame(frame))
        except FrameError as exc:
            problem = str(exc)
        if problem:
            errors.append(problem)
    return terminal, errors


@FUZZ
@given(st.lists(st.binary(max_size=200) | st.text(max_size=200), max_size=8))
@example([b"[" * 100_000, "{" * 50_000, b"\xff\xfe", '{"type": "resize", "rows": 1e400, "cols": 2}'])
def test_any_bytes_as_frames_raise_only_frame_errors(frames):
    route(frames)


@settings(FUZZ, max_examples=60)  # its examples are slow to generate
@given(st.lists(st.fixed_dictionaries({"type": st.sampled_from(["pty-input", "resize", "other", None]),
                                        "data": json_values}, optional={"input": json_values,
                                                                        "rows": json_values, "cols": json_values}),
                max_size=8))
def test_frame_shaped_json_is_applied_or_refused(frames):
    terminal, errors = route([json.dumps(f) for f in frames])
    assert len(terminal.calls) + len(errors) == len(frames)


@FUZZ
@given(json_values, json_values)
def test_socketio_events_raise_only_frame_errors(kind, payload):
    try:
        parsed = parse_event(kind, payload)
    except FrameError:
        return
    assert parsed["type"] in ("pty-input", "resize")


# -- tab lists ----------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode())
       | st.fixed_dictionaries({"tabs": json_values, "active_tab": json_values}).map(lambda v: json.dumps(v).encode()))
@example(b"[" * 100_000)
@example(b'{"tabs": ["1", "1"], "active_tab": "1"}')
def test_any_tab_body_is_accepted_whole_or_refused_with_400(body):
    try:
        tabs, active = parse_tabs(json_object(body))
    except HTTPError as exc:
        assert exc.status_code in (400, 413)
        return
    assert 1 <= len(tabs) <= 50 and len(set(tabs)) == len(tabs) and active in tabs
    assert all(isinstance(t, str) and t.isascii() and t.isalnum() and len(t) <= 32 for t in tabs)


# -- workspaces and paths -----------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every entry under `folder` (links not followed) and the content of its files."""
    seen: dict[str, bytes | None] = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root, name)
            rel = str(path.relative_to(folder))
            seen[rel] = None if path.is_symlink() or path.is_dir() else path.read_bytes()
    return seen


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Workspace, Path]:
    """A workspace whose links lead outside (a file, a folder, a loop), next to a bystander."""
    base = tmp_path_factory.mktemp("fuzz")
    outside = base / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("not yours")
    workspaces = Workspaces(base / "workspaces", list_ttl=0)
    workspace = workspaces.for_user("fuzzer")
    workspaces.for_user("bystander")
    (base / "workspaces" / "bystander" / "theirs.txt").write_text("theirs")
    root = workspace.root
    (root / "sub").mkdir()
    (root / "f.txt").write_text("inside")
    (root / "out").symlink_to(outside)
    (root / "link").symlink_to(outside / "secret.txt")
    (root / "sub" / "b").symlink_to("../../bystander")
    (root / "loop").symlink_to("loop")
    return workspace, base


def outside_and_temps(workspace: Path, base: Path) -> tuple[dict, list[str]]:
    outside = {k: v for k, v in snapshot(base).items() if not k.startswith("workspaces/fuzzer/")}
    temps = [k for k in snapshot(workspace) if ".3compute-" in k and k.endswith(".tmp")]
    return outside, temps


@FILE_FUZZ
@given(st.sampled_from(["read", "write", "create", "delete", "move"]), paths, paths, st.booleans())
@example("write", "out/secret.txt", "", False)
@example("move", "f.txt", "sub/b/theirs.txt", True)
@example("delete", "out", "", False)
@example("write", "a\ud800", "", False)
def test_any_path_stays_inside_and_leaves_no_temp_file(world, operation, path, other, overwrite):
    workspace, base = world
    before, _ = outside_and_temps(workspace.root, base)
    try:
        if operation == "read":
            with workspace.read(path).open():
                pass
        elif operation == "write":
            with workspace.open_writer(path, make_parents=overwrite) as writer:
                writer.write(b"fuzz")
                writer.commit()
        elif operation == "create":
            workspace.create(path)
        elif operation == "delete":
            workspace.delete(path)
        else:
            workspace.move(path, other, overwrite)
    except WorkspaceError as exc:
        assert exc.status in (400, 404, 409)
    after, temps = outside_and_temps(workspace.root, base)
    assert after == before  # the links themselves may go (a user's right); nothing they lead to
    assert temps == []
    restore_links(workspace.root, base)


def restore_links(root: Path, base: Path) -> None:
    """A move or delete may take a link away (that is the user's right); put it back for the next example."""
    for name, target in (("out", base / "outside"), ("link", base / "outside" / "secret.txt"), ("loop", Path("loop"))):
        if not (root / name).is_symlink():
            if (root / name).is_dir():
                shutil.rmtree(root / name)
            elif (root / name).exists():
                (root / name).unlink()
            (root / name).symlink_to(target)


# -- multipart ----------------------------------------------------------------------------

BOUNDARY = b"fuzzboundary"


def part(name: str, filename: str | None, data: bytes) -> bytes:
    disposition = f'form-data; name="{name}"' + ("" if filename is None else f'; filename="{filename}"')
    head = f"\r\nContent-Disposition: {disposition}\r\n\r\n".encode(errors="surrogatepass")  # bad UTF-8 too
    return b"--" + BOUNDARY + head + data + b"\r\n"


multipart_bodies = st.one_of(
    st.binary(max_size=400),
    st.lists(st.tuples(st.sampled_from(["files", "move-into", "x"]), st.none() | paths, st.binary(max_size=60)),
             max_size=4).map(lambda parts: b"".join(part(n, f, d) for n, f, d in parts) + b"--" + BOUNDARY + b"--\r\n"),
)


def chunked(body: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(len(body), c) for c in cuts} | {0, len(body)})
    return [body[a:b] for a, b in zip(points, points[1:], strict=False)]


@FILE_FUZZ
@given(multipart_bodies, st.lists(st.integers(0, 400), max_size=6), st.booleans(), st.booleans())
@example(part("files", "../../escape.txt", b"x") + b"--fuzzboundary--\r\n", [], True, False)
@example(part("files", "out/secret.txt", b"overwritten?") + b"--fuzzboundary--\r\n", [3], True, False)
@example(part("files", "ok.txt", b"a") + part("files", "bad\x00.txt", b"b"), [], True, True)
def test_any_upload_body_lands_whole_or_not_at_all(world, body, cuts, keep_folders, hang_up):
    workspace, base = world
    before, _ = outside_and_temps(workspace.root, base)
    inside_before = snapshot(workspace.root)
    batch = UploadBatch(workspace, BOUNDARY, keep_folders)
    landed = False
    try:
        for chunk in chunked(body, cuts):
            batch.feed(chunk)
        if hang_up:  # the client went away before the end
            batch.abort()
        else:
            landed = batch.finish() > 0
    except (MultipartError, WorkspaceError):
        batch.abort()
    after, temps = outside_and_temps(workspace.root, base)
    assert after == before
    assert temps == []
    if not landed:  # all or nothing: no file changed (folders made for parents may stay)
        inside_after = snapshot(workspace.root)
        assert {k: v for k, v in inside_after.items() if v is not None} == \
               {k: v for k, v in inside_before.items() if v is not None and k in inside_after}
    restore_links(workspace.root, base)


@FUZZ
@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=5))
def test_the_parser_alone_raises_only_multipart_errors(body, cuts):
    sinks: list[Sink] = []

    def open_file(name: str, filename: str) -> Sink:
        sinks.append(Sink())
        return sinks[-1]

    parser = MultipartParser(BOUNDARY, open_file)
    try:
        for chunk in chunked(body, cuts):
            parser.feed(chunk)
        parser.finish()
    except MultipartError:
        assert all(s.state in ("committed", "aborted") for s in sinks)
        return
    assert all(s.state == "committed" for s in sinks)


@FUZZ
@given(st.text(max_size=120))
def test_any_content_type_gives_a_boundary_or_a_multipart_error(content_type):
    try:
        boundary = MultipartParser.boundary_from_content_type(content_type)
    except MultipartError:
        return
    assert 1 <= len(boundary) <= 70


class Sink:
    def __init__(self) -> None:
        self.state = "open"

    def write(self, data: bytes) -> None:
        assert self.state == "open"

    def commit(self) -> None:
        assert self.state == "open"
        self.state = "committed"

    def abort(self) -> None:
        if self.state == "open":
            self.state = "aborted"
