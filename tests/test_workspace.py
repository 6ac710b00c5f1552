"""The workspace layer: path safety against hostile paths and symlinks, atomic writes, moves,
creation, media types, the listing cache and ownership, all on real files."""

from __future__ import annotations

import gc
import os
import stat
import threading
import weakref
from collections.abc import Callable
from pathlib import Path

import pytest

from threecompute.workspace import (
    CACHED_READ_DEPTH,
    FileInfo,
    Workspace,
    WorkspaceError,
    Workspaces,
    filesystem_type,
)

TEXT = "text/plain; charset=utf-8"
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256))
CONTAINER_OWNER = (999, 995)


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every entry under `folder` (not following links) with its bytes; None for folders."""
    found: dict[str, bytes | None] = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        found[rel] = None if path.is_dir() and not path.is_symlink() else (
            os.readlink(path).encode() if path.is_symlink() else path.read_bytes())
    return found


def status_of(call: Callable[[], object]) -> int | None:
    try:
        call()
    except WorkspaceError as exc:
        return exc.status
    return None


def expect_status(status: int, call: Callable[[], object]) -> None:
    try:
        result = call()
    except WorkspaceError as exc:
        assert exc.status == status, f"expected {status}, got {exc.status}: {exc.message}"
        return
    pytest.fail(f"expected WorkspaceError({status}), the call returned {result!r}")


def write(workspace: Workspace, rel: str, data: bytes, make_parents: bool = False) -> None:
    with workspace.open_writer(rel, make_parents=make_parents) as writer:
        writer.write(data)
        writer.commit()


@pytest.fixture
def workspaces(tmp_path: Path) -> Workspaces:
    return Workspaces(tmp_path / "workspaces", list_ttl=0)


@pytest.fixture
def ws(workspaces: Workspaces) -> Workspace:
    return workspaces.for_user("alice")


class Hostile:
    """An outside folder with a secret, and links to it planted in the workspace."""

    def __init__(self, tmp_path: Path, ws: Workspace) -> None:
        self.outside = tmp_path / "outside"
        (self.outside / "sub").mkdir(parents=True)
        self.secret = self.outside / "secret.txt"
        self.secret.write_bytes(b"top secret")
        (self.outside / "sub" / "deep.txt").write_bytes(b"deep")
        neighbour = tmp_path / "workspaces" / "bob"
        neighbour.mkdir()
        (neighbour / "bob.txt").write_bytes(b"bob's")
        (ws.root / "mine.txt").write_bytes(b"mine")
        (ws.root / "folder").mkdir()
        (ws.root / "folder" / "inner.txt").write_bytes(b"inner")
        for name, target in [("out_dir", self.outside), ("out_file", self.secret),
                             ("bob", neighbour), ("up", ".."), ("rel_up", "../../outside"),
                             ("dangling", tmp_path / "nowhere"), ("loop", "loop")]:
            os.symlink(target, ws.root / name)
        os.symlink(self.outside, ws.root / "folder" / "nested_out")
        self.before = snapshot(tmp_path / "outside") | {"bob/" + k: v for k, v in snapshot(neighbour).items()}
        self.tmp_path = tmp_path
        self.links = {name: os.readlink(ws.root / name)
                      for name in ["out_dir", "out_file", "bob", "up", "rel_up", "dangling", "loop"]}
        self.ws = ws

    def assert_untouched(self) -> None:
        after = snapshot(self.tmp_path / "outside") | {
            "bob/" + k: v for k, v in snapshot(self.tmp_path / "workspaces" / "bob").items()}
        assert after == self.before, f"outside content changed: before {self.before}, after {after}"
        links = {name: os.readlink(self.ws.root / name) for name in self.links}
        assert links == self.links, f"planted links changed: {links}"


@pytest.fixture
def hostile(tmp_path: Path, ws: Workspace) -> Hostile:
    return Hostile(tmp_path, ws)


# --- traversal in path strings ---

ESCAPING = ["..", "../x", "a/../../x", "a/..", "./../x", "a\\b", "..\\x", "x\x00y", "folder/../../outside/secret.txt"]


@pytest.mark.parametrize("path", ESCAPING)
def test_escaping_paths_are_refused_everywhere(ws: Workspace, hostile: Hostile, path: str) -> None:
    operations = {
        "read": lambda: ws.read(path),
        "open_writer": lambda: ws.open_writer(path, make_parents=True),
        "create": lambda: ws.create(path),
        "create folder": lambda: ws.create(path + "/"),
        "delete": lambda: ws.delete(path),
        "move source": lambda: ws.move(path, "moved"),
        "move destination": lambda: ws.move("mine.txt", path),
    }
    seen = {name: status_of(call) for name, call in operations.items()}
    assert seen == dict.fromkeys(operations, 400), f"{path!r}: {seen}"
    assert (ws.root / "mine.txt").read_bytes() == b"mine"
    hostile.assert_untouched()


def test_absolute_path_stays_inside(ws: Workspace, tmp_path: Path) -> None:
    real_passwd = Path("/etc/passwd").read_bytes()
    write(ws, "/etc/passwd", b"harmless", make_parents=True)
    assert (ws.root / "etc" / "passwd").read_bytes() == b"harmless"
    assert Path("/etc/passwd").read_bytes() == real_passwd
    assert ws.read("/etc/passwd").size == len(b"harmless")


@pytest.mark.parametrize("path", ["....//x", "%2e%2e/x", "%2e%2e%2fx", ".../x"])
def test_odd_names_are_just_names(ws: Workspace, path: str) -> None:
    write(ws, path, b"odd", make_parents=True)
    landed = [p for p in ws.root.rglob("*") if p.is_file()]
    assert len(landed) == 1 and landed[0].read_bytes() == b"odd", f"{path!r} landed at {landed}"
    assert ws.root in landed[0].parents


def test_empty_paths_are_refused(ws: Workspace) -> None:
    for call in [lambda: ws.read(""), lambda: ws.read("/"), lambda: ws.open_writer("/"),
                 lambda: ws.create("/"), lambda: ws.delete(""), lambda: ws.delete("/"),
                 lambda: ws.move("", "x"), lambda: ws.move("x", "")]:
        expect_status(400, call)
    assert ws.root.is_dir()


@pytest.mark.parametrize("user_id", ["", ".", "..", "a/b", "a\\b", "a\x00b"])
def test_bad_user_ids_are_refused(workspaces: Workspaces, user_id: str) -> None:
    expect_status(400, lambda: workspaces.for_user(user_id))


# --- hostile symlinks ---

OUTSIDE_FILES = ["out_file", "out_dir/secret.txt", "out_dir/sub/deep.txt", "bob/bob.txt", "up/bob/bob.txt",
                 "rel_up/secret.txt", "folder/nested_out/secret.txt"]


@pytest.mark.parametrize("path", OUTSIDE_FILES)
def test_read_through_outside_link_is_refused(ws: Workspace, hostile: Hostile, path: str) -> None:
    expect_status(400, lambda: ws.read(path))
    expect_status(400, lambda: ws.read_cached(path, 1 << 20))
    hostile.assert_untouched()


@pytest.mark.parametrize("path", OUTSIDE_FILES + ["out_dir/new.txt", "bob/new.txt", "up/new.txt"])
def test_write_through_outside_link_is_refused(ws: Workspace, hostile: Hostile, path: str) -> None:
    expect_status(400, lambda: ws.open_writer(path))
    expect_status(400, lambda: ws.open_writer(path, make_parents=True))
    hostile.assert_untouched()


@pytest.mark.parametrize("path", ["out_dir/new/deeper.txt", "bob/new/x.txt", "folder/nested_out/a/b.txt"])
def test_make_parents_through_outside_link_is_refused(ws: Workspace, hostile: Hostile, path: str) -> None:
    expect_status(400, lambda: ws.open_writer(path, make_parents=True))
    expect_status(400, lambda: ws.create(path))
    hostile.assert_untouched()


def test_dangling_link_is_neither_written_nor_made_a_folder(ws: Workspace, hostile: Hostile) -> None:
    expect_status(400, lambda: ws.open_writer("dangling"))
    expect_status(400, lambda: ws.open_writer("dangling/x.txt", make_parents=True))
    expect_status(400, lambda: ws.create("dangling/"))
    assert not (hostile.tmp_path / "nowhere").exists()
    hostile.assert_untouched()


@pytest.mark.parametrize("path", ["out_file", "out_dir", "out_dir/", "out_dir/new", "out_dir/new/", "bob", "up/x",
                                  "dangling", "loop/x"])
def test_create_through_outside_link_is_refused(ws: Workspace, hostile: Hostile, path: str) -> None:
    expect_status(400, lambda: ws.create(path))
    hostile.assert_untouched()


@pytest.mark.parametrize("path", ["out_file", "out_dir", "out_dir/", "out_dir/secret.txt", "out_dir/sub", "bob",
                                  "bob/bob.txt", "up", "dangling", "folder/nested_out/sub"])
def test_delete_of_or_through_outside_link_is_refused(ws: Workspace, hostile: Hostile, path: str) -> None:
    expect_status(400, lambda: ws.delete(path))
    hostile.assert_untouched()


def test_deleting_a_folder_holding_outside_links_leaves_their_targets(ws: Workspace, hostile: Hostile) -> None:
    ws.delete("folder")
    assert not (ws.root / "folder").exists()
    hostile.assert_untouched()


@pytest.mark.parametrize(("source", "destination"), [
    ("out_file", "stolen.txt"), ("out_dir", "stolen"), ("out_dir/secret.txt", "stolen.txt"),
    ("bob/bob.txt", "stolen.txt"), ("up/bob", "stolen"), ("dangling", "x"),
    ("mine.txt", "out_dir/mine.txt"), ("mine.txt", "out_dir/sub/new/mine.txt"), ("mine.txt", "bob/mine.txt"),
    ("mine.txt", "up/planted.txt"), ("folder", "out_dir/folder"), ("mine.txt", "out_file"),
    ("mine.txt", "out_dir"), ("mine.txt", "dangling"),
])
@pytest.mark.parametrize("overwrite", [False, True])
def test_move_through_outside_link_is_refused(ws: Workspace, hostile: Hostile, source: str, destination: str,
                                              overwrite: bool) -> None:
    before = snapshot(ws.root)
    expect_status(400, lambda: ws.move(source, destination, overwrite=overwrite))
    assert snapshot(ws.root) == before, "the workspace changed"
    hostile.assert_untouched()


def test_listing_leaves_out_outside_and_dangling_links(ws: Workspace, hostile: Hostile) -> None:
    listing = ws.list_files()
    assert listing == ["folder/", "folder/inner.txt", "mine.txt"], listing


def test_links_inside_are_followed_but_not_descended_by_the_listing(ws: Workspace) -> None:
    (ws.root / "real" / "sub").mkdir(parents=True)
    (ws.root / "real" / "f.txt").write_bytes(b"real content")
    os.symlink("real", ws.root / "link")
    os.symlink("real/f.txt", ws.root / "flink")
    os.symlink(ws.root / "real" / "sub", ws.root / "abs_sub")
    os.symlink(".", ws.root / "self")

    assert ws.list_files() == ["abs_sub/", "flink", "link/", "real/", "real/f.txt", "real/sub/", "self/"]
    assert ws.read("link/f.txt").size == len(b"real content")
    assert ws.read("flink").path == (ws.root / "real" / "f.txt").resolve()
    assert ws.read("self/self/real/f.txt").media_type == TEXT
    write(ws, "flink", b"through the link")
    assert (ws.root / "real" / "f.txt").read_bytes() == b"through the link"
    assert os.readlink(ws.root / "flink") == "real/f.txt", "the link itself was replaced"
    write(ws, "link/new.txt", b"new")
    ws.create("abs_sub/made/")
    assert (ws.root / "real" / "new.txt").read_bytes() == b"new"
    assert (ws.root / "real" / "sub" / "made").is_dir()
    expect_status(400, lambda: ws.open_writer("link"))

    ws.delete("link")
    assert not (ws.root / "link").exists() and (ws.root / "real" / "f.txt").exists(), "delete followed the link"


def test_moving_a_folder_into_itself_through_a_link_is_refused(ws: Workspace) -> None:
    (ws.root / "a" / "x").mkdir(parents=True)
    (ws.root / "a" / "x" / "keep.txt").write_bytes(b"keep")
    os.symlink("a", ws.root / "alias")
    expect_status(400, lambda: ws.move("a", "alias/x", overwrite=True))
    expect_status(400, lambda: ws.move("a", "alias/new/place"))
    assert (ws.root / "a" / "x" / "keep.txt").read_bytes() == b"keep"
    assert (ws.root / "a").is_dir() and not (ws.root / "a" / "new" / "place").exists()


def test_moving_a_file_onto_itself_through_a_link_is_refused(ws: Workspace) -> None:
    (ws.root / "f.txt").write_bytes(b"precious")
    os.symlink(".", ws.root / "here")
    expect_status(400, lambda: ws.move("f.txt", "here/f.txt", overwrite=True))
    assert (ws.root / "f.txt").read_bytes() == b"precious"


# --- reading ---

def test_read_missing_or_folder_is_404(ws: Workspace) -> None:
    (ws.root / "dir").mkdir()
    os.mkfifo(ws.root / "pipe")
    for path in ["missing.txt", "dir", "dir/", "missing/deeper.txt", "pipe"]:
        expect_status(404, lambda path=path: ws.read(path))


@pytest.mark.parametrize(("name", "content", "media", "attachment"), [
    ("main.py", b"print('hi')\n", TEXT, False),
    ("page.html", b"<script>alert(1)</script>", TEXT, False),
    ("icon.svg", b"<svg xmlns='http://www.w3.org/2000/svg'><script>alert(1)</script></svg>", "image/svg+xml", False),
    ("data.json", b'{"a": 1}', TEXT, False),
    ("app.js", "const s = '\u00e9\u4e2d';".encode(), TEXT, False),
    ("no_extension", b"plain words", TEXT, False),
    ("empty.txt", b"", TEXT, False),
    ("photo.png", PNG, "image/png", False),
    ("text_named.png", b"not really a png", "image/png", False),
    ("blob.bin", bytes(range(256)) * 4, "application/octet-stream", True),
    ("blob", b"\xff\xfe\x00binary", "application/octet-stream", True),
    ("binary.html", b"\xff<script>alert(1)</script>", "text/html", True),
    ("binary.svg", b"\xff<svg/>", "image/svg+xml", False),
    ("archive.zip", b"PK\x03\x04\xff\xff", "application/zip", True),
])
def test_media_types(ws: Workspace, name: str, content: bytes, media: str, attachment: bool) -> None:
    (ws.root / name).write_bytes(content)
    info = ws.read(name)
    assert (info.media_type, info.as_attachment, info.size) == (media, attachment, len(content)), info


def test_utf8_character_cut_at_the_sniff_boundary_is_still_text(ws: Workspace) -> None:
    cut = b"a" * (64 * 1024 - 1) + "\u00e9".encode() + b"tail"
    (ws.root / "long.txt").write_bytes(cut)
    assert ws.read("long.txt").media_type == TEXT
    (ws.root / "truncated.txt").write_bytes(b"abc" + "\u00e9".encode()[:1])
    assert ws.read("truncated.txt").media_type == "text/plain", "a file ending mid-character is not UTF-8"


def test_file_info_open_reads_the_checked_file(ws: Workspace, hostile: Hostile) -> None:
    info = ws.read("folder/inner.txt")
    with info.open() as file:
        assert file.read() == b"inner"
    # The user swaps the folder for a link outside between the check and the read.
    os.rename(ws.root / "folder", ws.root / "folder_was")
    os.symlink(hostile.outside, ws.root / "folder")
    (hostile.outside / "inner.txt").write_bytes(b"outside")
    expect_status(404, info.open)
    swapped = FileInfo(info.path, 0, TEXT, False)
    expect_status(404, swapped.open)


def test_read_cached_answers_small_files_in_the_page_cache(ws: Workspace) -> None:
    (ws.root / "small.txt").write_bytes(b"hello")
    (ws.root / "image.png").write_bytes(PNG)
    info, content = ws.read_cached("small.txt", 1024)
    assert (content, info.size, info.media_type, info.as_attachment) == (b"hello", 5, TEXT, False)
    info, content = ws.read_cached("image.png", 1024)
    assert (content, info.media_type) == (PNG, "image/png")
    assert ws.read_cached("image.png", len(PNG) - 1) is None, "larger than the limit: for a worker"
    expect_status(404, lambda: ws.read_cached("missing.txt", 1024))
    (ws.root / "folder").mkdir()
    expect_status(404, lambda: ws.read_cached("folder", 1024))


def test_read_cached_leaves_pages_on_the_disk_to_a_worker(ws: Workspace) -> None:
    path = ws.root / "cold.bin"
    path.write_bytes(os.urandom(32 * 1024))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages cannot be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    assert ws.read_cached("cold.bin", 1 << 20) is None, "reading it would have waited for the disk"
    assert ws.read("cold.bin").size == 32 * 1024
    with ws.read("cold.bin").open() as file:
        file.read()
    assert ws.read_cached("cold.bin", 1 << 20) is not None, "in the page cache once read"


def test_read_cached_leaves_deep_paths_to_a_worker(ws: Workspace) -> None:
    deep = "/".join(["d"] * CACHED_READ_DEPTH)
    (ws.root / deep).mkdir(parents=True)
    (ws.root / deep / "f.txt").write_bytes(b"deep")
    (ws.root / deep / ".." / "g.txt").write_bytes(b"shallower")
    assert ws.read_cached(deep.rsplit("/", 1)[0] + "/g.txt", 1024)[1] == b"shallower"
    assert ws.read_cached(deep + "/f.txt", 1024) is None, "one folder too deep for the loop"
    assert ws.read(deep + "/f.txt").size == 4


def test_read_cached_never_touches_a_network_filesystem(ws: Workspace) -> None:
    (ws.root / "small.txt").write_bytes(b"hello")
    ws.on_local_disk = False
    assert ws.read_cached("small.txt", 1024) is None


MOUNTINFO = [
    "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw",
    "40 22 0:35 / /srv/shared rw,relatime shared:20 - nfs4 fileserver:/export rw,vers=4.2",
    "41 40 0:36 / /srv/shared/local\\040disk rw shared:21 - tmpfs tmpfs rw",
    "42 22 0:37 / /srv/sharedness rw shared:22 - xfs /dev/vdb rw",
]


@pytest.mark.parametrize("path, expected", [
    ("/", "ext4"), ("/home/u", "ext4"), ("/srv/shared", "nfs4"), ("/srv/shared/workspaces/u", "nfs4"),
    ("/srv/sharedness/u", "xfs"), ("/srv/shared/local disk/u", "tmpfs"),
])
def test_filesystem_type_is_the_longest_mount_point_above(path: str, expected: str) -> None:
    assert filesystem_type(path, MOUNTINFO) == expected


def test_fresh_listing_is_the_cached_one_until_a_change(tmp_path: Path) -> None:
    ws = Workspaces(tmp_path, list_ttl=3600).for_user("u")
    assert ws.fresh_listing() is None, "nothing scanned yet"
    scanned = ws.listing()
    assert ws.fresh_listing() is scanned
    assert scanned.json == b'{"files": []}'
    write(ws, "new.txt", b"x")
    assert ws.fresh_listing() is None, "a change makes the next poll scan"


def test_an_idle_workspace_is_let_go_and_one_in_use_is_found_again(tmp_path: Path) -> None:
    workspaces = Workspaces(tmp_path / "workspaces", list_ttl=3600)
    held = workspaces.for_user("busy")
    write(held, "kept.txt", b"x")
    temp_file = held.temp_dir / "upload.tmp"
    temp_file.write_bytes(b"half an upload")
    idle = weakref.ref(workspaces.for_user("idle"))
    workspaces.forget_idle()
    assert workspaces.loaded("idle") is idle(), "used in the period before: still kept"
    workspaces.forget_idle()
    workspaces.forget_idle()
    gc.collect()
    assert idle() is None and workspaces.loaded("idle") is None, "two periods unused: let go"
    assert workspaces.for_user("busy") is held, "still referenced: the same one, never a second"
    assert temp_file.exists(), "an operation's temporary file is left alone"
    del held
    workspaces.forget_idle()
    workspaces.forget_idle()
    gc.collect()
    assert workspaces.loaded("busy") is None
    again = workspaces.for_user("busy")
    assert again.list_files() == ["kept.txt"], "the files stay; only the server's handle goes"


# --- writing ---

def test_write_is_atomic(ws: Workspace) -> None:
    (ws.root / "f.txt").write_bytes(b"old")
    writer = ws.open_writer("f.txt")
    writer.write(b"new ")
    writer.write(b"content")
    assert (ws.root / "f.txt").read_bytes() == b"old", "a reader saw the new content before commit"
    assert ws.list_files() == ["f.txt"], "the temporary file is listed"
    writer.commit()
    assert (ws.root / "f.txt").read_bytes() == b"new content"
    assert os.listdir(ws.root) == ["f.txt"], f"left behind: {os.listdir(ws.root)}"


def test_abort_leaves_nothing(ws: Workspace) -> None:
    (ws.root / "f.txt").write_bytes(b"old")
    for writer in [ws.open_writer("f.txt"), ws.open_writer("new.txt")]:
        writer.write(b"half")
        writer.abort()
        writer.abort()
    assert sorted(os.listdir(ws.root)) == ["f.txt"], os.listdir(ws.root)
    assert (ws.root / "f.txt").read_bytes() == b"old"


def test_writer_context_aborts_on_error(ws: Workspace) -> None:
    with pytest.raises(RuntimeError), ws.open_writer("f.txt") as writer:
        writer.write(b"half")
        raise RuntimeError("client went away")
    assert os.listdir(ws.root) == []


def test_write_is_binary_safe_and_creates_absent_files(ws: Workspace) -> None:
    data = bytes(range(256)) * 1000
    write(ws, "bin.dat", data)
    assert (ws.root / "bin.dat").read_bytes() == data


def test_writer_needs_the_parent_unless_asked_to_make_it(ws: Workspace) -> None:
    expect_status(404, lambda: ws.open_writer("a/b/c.txt"))
    assert not (ws.root / "a").exists()
    write(ws, "a/b/c.txt", b"made", make_parents=True)
    assert (ws.root / "a" / "b" / "c.txt").read_bytes() == b"made"


def test_writer_refuses_folders(ws: Workspace) -> None:
    (ws.root / "dir").mkdir()
    (ws.root / "file.txt").write_bytes(b"x")
    expect_status(400, lambda: ws.open_writer("dir"))
    expect_status(409, lambda: ws.open_writer("file.txt/inner.txt", make_parents=True))
    expect_status(404, lambda: ws.open_writer("file.txt/inner.txt"))


def test_folder_appearing_before_commit_is_refused(ws: Workspace) -> None:
    writer = ws.open_writer("late")
    writer.write(b"x")
    (ws.root / "late").mkdir()
    expect_status(400, writer.commit)
    assert os.listdir(ws.root) == ["late"]


def test_replacing_keeps_permissions(ws: Workspace) -> None:
    (ws.root / "run.sh").write_bytes(b"#!/bin/sh\n")
    os.chmod(ws.root / "run.sh", 0o755)
    write(ws, "run.sh", b"#!/bin/sh\necho hi\n")
    assert stat.S_IMODE(os.stat(ws.root / "run.sh").st_mode) == 0o755


def test_new_files_and_folders_are_group_writable_without_owner(ws: Workspace) -> None:
    write(ws, "a/b.txt", b"x", make_parents=True)
    ws.create("c/d/")
    ws.create("e.txt")
    modes = {p: oct(stat.S_IMODE(os.stat(ws.root / p).st_mode)) for p in ["a", "a/b.txt", "c", "c/d", "e.txt"]}
    assert modes == {"a": "0o775", "a/b.txt": "0o664", "c": "0o775", "c/d": "0o775", "e.txt": "0o664"}


# --- create ---

def test_create_file_and_folder(ws: Workspace) -> None:
    ws.create("empty.txt")
    ws.create("/new/folder/")
    ws.create("deep/down/file.py")
    assert (ws.root / "empty.txt").read_bytes() == b""
    assert (ws.root / "new" / "folder").is_dir()
    assert (ws.root / "deep" / "down" / "file.py").is_file()
    assert ws.list_files() == ["deep/", "deep/down/", "deep/down/file.py", "empty.txt", "new/", "new/folder/"]


def test_create_existing_and_clashes(ws: Workspace) -> None:
    ws.create("f.txt")
    ws.create("d/")
    seen = {path: status_of(lambda path=path: ws.create(path)) for path in ["f.txt", "d/", "f.txt/", "d"]}
    assert seen == {"f.txt": 400, "d/": 400, "f.txt/": 409, "d": 409}, seen
    expect_status(409, lambda: ws.create("f.txt/inner.txt"))


# --- delete ---

def test_delete_file_and_tree(ws: Workspace) -> None:
    write(ws, "tree/a/b/c.txt", b"c", make_parents=True)
    write(ws, "f.txt", b"f")
    ws.delete("/f.txt")
    ws.delete("tree/")
    assert os.listdir(ws.root) == []
    expect_status(404, lambda: ws.delete("f.txt"))
    expect_status(404, lambda: ws.delete("missing/deeper"))


# --- move ---

def test_move_renames_files_and_folders(ws: Workspace) -> None:
    write(ws, "a.txt", b"a")
    write(ws, "dir/inner.txt", b"inner", make_parents=True)
    ws.move("a.txt", "b.txt")
    ws.move("dir", "/renamed")
    ws.move("b.txt", "new/parents/b.txt")
    assert ws.list_files() == ["new/", "new/parents/", "new/parents/b.txt", "renamed/", "renamed/inner.txt"]


def test_move_statuses(ws: Workspace) -> None:
    write(ws, "a.txt", b"a")
    write(ws, "b.txt", b"b")
    write(ws, "dir/x.txt", b"x", make_parents=True)
    cases = {
        ("", "x"): 400, ("a.txt", ""): 400, ("/", "x"): 400,
        ("missing.txt", "x"): 404, ("missing/deeper", "x"): 404,
        ("dir", "dir/sub"): 400, ("dir", "dir"): 400, ("a.txt", "a.txt"): 400,
        ("a.txt", "b.txt"): 409, ("dir", "a.txt"): 409, ("a.txt", "dir"): 409,
    }
    seen = {case: status_of(lambda case=case: ws.move(*case)) for case in cases}
    assert seen == cases, seen
    assert not (ws.root / "dir" / "sub").exists(), "parents were created for a refused move"
    assert (ws.root / "a.txt").read_bytes() == b"a" and (ws.root / "b.txt").read_bytes() == b"b"


def test_move_overwrite(ws: Workspace) -> None:
    write(ws, "a.txt", b"a")
    write(ws, "b.txt", b"b")
    write(ws, "src/new.txt", b"new", make_parents=True)
    write(ws, "dst/old.txt", b"old", make_parents=True)
    ws.move("a.txt", "b.txt", overwrite=True)
    ws.move("src", "dst", overwrite=True)
    assert ws.list_files() == ["b.txt", "dst/", "dst/new.txt"]
    assert (ws.root / "b.txt").read_bytes() == b"a"
    ws.move("b.txt", "dst", overwrite=True)
    assert (ws.root / "dst").read_bytes() == b"a"


def test_moving_an_inside_link_moves_the_link(ws: Workspace) -> None:
    (ws.root / "target.txt").write_bytes(b"t")
    os.symlink(ws.root / "target.txt", ws.root / "link")
    ws.move("link", "moved")
    assert os.readlink(ws.root / "moved") == str(ws.root / "target.txt")
    assert (ws.root / "target.txt").read_bytes() == b"t"


# --- the listing and its cache ---

def test_listing_marks_folders_and_sorts(ws: Workspace) -> None:
    for path in ["b/z.txt", "a.txt", "b/a/deep.txt"]:
        write(ws, path, b"x", make_parents=True)
    (ws.root / "empty").mkdir()
    assert ws.list_files() == ["a.txt", "b/", "b/a/", "b/a/deep.txt", "b/z.txt", "empty/"]


def test_listing_is_cached_and_invalidated_by_every_change(tmp_path: Path) -> None:
    ws = Workspaces(tmp_path, list_ttl=3600).for_user("u")
    assert ws.list_files() == []
    (ws.root / "from_terminal.txt").write_bytes(b"x")
    assert ws.list_files() == [], "not cached"
    changes = [
        (lambda: write(ws, "put.txt", b"x"), "put.txt"),
        (lambda: ws.create("made/"), "made/"),
        (lambda: ws.move("put.txt", "moved.txt"), "moved.txt"),
    ]
    for change, expected in changes:
        change()
        assert expected in ws.list_files(), f"{expected} missing after a change: {ws.list_files()}"
    ws.delete("made")
    assert "made/" not in ws.list_files()
    assert "from_terminal.txt" in ws.list_files()


def test_listing_expires(tmp_path: Path) -> None:
    ws = Workspaces(tmp_path, list_ttl=0.05).for_user("u")
    assert ws.list_files() == []
    (ws.root / "later.txt").write_bytes(b"x")
    threading.Event().wait(0.1)
    assert ws.list_files() == ["later.txt"]


def test_for_user_keeps_one_workspace_per_user(workspaces: Workspaces) -> None:
    first = workspaces.for_user("alice")
    assert workspaces.for_user("alice") is first
    assert workspaces.for_user("bob") is not first
    assert first.root == workspaces.base_dir / "alice" and first.root.is_dir()


def test_thousands_of_entries_list_quickly_and_concurrently(tmp_path: Path) -> None:
    ws = Workspaces(tmp_path, list_ttl=0.25).for_user("u")
    for folder in range(50):
        (ws.root / f"d{folder:02}").mkdir()
        for name in range(60):
            (ws.root / f"d{folder:02}" / f"f{name:02}.txt").write_bytes(b"")
    results: list[int] = []
    errors: list[BaseException] = []

    def poll() -> None:
        try:
            for _ in range(50):
                results.append(len(ws.list_files()))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=poll) for _ in range(8)]
    for thread in threads:
        thread.start()
    for index in range(20):
        write(ws, f"w{index}.txt", b"x")
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert len(results) == 400 and min(results) >= 3050, (min(results), max(results))
    assert len(ws.list_files()) == 3070


# --- ownership ---

@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_everything_created_is_owned_by_the_container_user(tmp_path: Path) -> None:
    ws = Workspaces(tmp_path / "workspaces", owner=CONTAINER_OWNER, list_ttl=0).for_user("u")
    writer = ws.open_writer("up/load/file.txt", make_parents=True)
    writer.write(b"x")
    temp = list(ws.temp_dir.iterdir())
    temp_owner = [(os.stat(p).st_uid, os.stat(p).st_gid) for p in temp]
    writer.commit()
    ws.create("made/folder/")
    ws.create("made/file.txt")
    write(ws, "other.txt", b"o")
    ws.move("other.txt", "moved/into/other.txt")
    created = ["", "up", "up/load", "up/load/file.txt", "made", "made/folder", "made/file.txt", "moved",
               "moved/into", "moved/into/other.txt"]
    owners = {p: (os.stat(ws.root / p).st_uid, os.stat(ws.root / p).st_gid) for p in created}
    assert owners == dict.fromkeys(created, CONTAINER_OWNER), owners
    assert temp_owner == [CONTAINER_OWNER], f"temporary file {temp}: {temp_owner}"
