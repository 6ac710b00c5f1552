"""Every file operation on one user's workspace, each path resolved safely in one place.

A workspace is the folder `DATA_DIR/workspaces/<user id>/`, mounted at `/app` in the user's
container. The user controls its contents from a terminal, symlinks included (to `/etc`, to
other users' workspaces, to `..`), and can change them while a request is being served. So
no operation here trusts a path string: each one walks the path a component at a time from
an open descriptor of the root, checks after every step that the folder it reached is still
inside the root (by asking the kernel where the descriptor really is), and then acts on the
final name relative to that descriptor, never following a link it has not checked. A link
swapped in half-way through a request can therefore not redirect it outside.

Nothing here knows HTTP: failures are `WorkspaceError(status, message)` with a status of 400,
404, 409, or 507 when the disk (or the quota) is full, which the handlers turn into JSON
errors. A write that fails for lack of space leaves nothing behind: its temporary file is
removed, and the file it would have replaced is untouched. Calls are synchronous and thread-safe;
the handlers run them in an executor, except the two that never wait for a disk
(`fresh_listing`, `read_cached`).
"""

from __future__ import annotations

import codecs
import errno
import functools
import json
import logging
import mimetypes
import os
import secrets
import shutil
import stat
import tempfile
import threading
import time
import weakref
import zipfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import BinaryIO

from .workspace_disks import DiskError, WorkspaceDisks

log = logging.getLogger(__name__)

FILE_MODE = 0o664
FOLDER_MODE = 0o775
TEXT_TYPE = "text/plain; charset=utf-8"
SNIFF_BYTES = 64 * 1024
OUTSIDE = "path leads outside the workspace"
# The types a browser may render inline from the API's origin. Raster images carry no
# script. SVG can, so it is kept by name whatever its content only because the file API
# always answers with a sandboxing Content-Security-Policy (no script runs in a page of it).
IMAGE_TYPES = frozenset({
    "image/png", "image/jpeg", "image/gif", "image/webp", "image/bmp", "image/x-ms-bmp",
    "image/x-icon", "image/vnd.microsoft.icon", "image/svg+xml",
})
# Filesystems whose every lookup may wait for another machine: never touched on the IOLoop.
NETWORK_FILESYSTEMS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "9p", "afs",
                                 "lustre", "gpfs", "fuse", "fuseblk"})
# `read_cached` walks at most this many folders (one `openat` each): a path thousands of
# folders deep is left to a worker, so that no request can hold the IOLoop for long.
CACHED_READ_DEPTH = 16
# The listing answers at most this many entries (shallowest first); see `Listing`.
MAX_LISTED_ENTRIES = 10_000
_FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
DISK_FULL = "no space left on the server's disk"
_ERRNO_ANSWERS = {
    errno.ENOENT: (404, "no such file or folder"),
    errno.ENOTDIR: (404, "no such file or folder"),
    errno.EISDIR: (400, "that is a folder"),
    errno.EEXIST: (409, "already exists"),
    errno.ENOTEMPTY: (409, "already exists"),
    errno.ELOOP: (400, "too many levels of symbolic links"),
    errno.ENAMETOOLONG: (400, "name too long"),
    errno.EINVAL: (400, "invalid path"),
    errno.EACCES: (400, "permission denied"),
    errno.EPERM: (400, "permission denied"),
    errno.ENOSPC: (507, DISK_FULL),
    errno.EDQUOT: (507, DISK_FULL),
}

Owner = tuple[int, int]


class WorkspaceError(Exception):
    """A request the workspace refuses; `status` is 400, 404, 409 or 507."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@contextmanager
def _os_errors() -> Iterator[None]:
    """Turn the OS errors a user's request can cause into WorkspaceErrors; others propagate."""
    try:
        yield
    except OSError as exc:
        answer = _ERRNO_ANSWERS.get(exc.errno or 0)
        if answer is None:
            raise
        raise WorkspaceError(*answer) from exc


def _writer_errors(method: Callable[..., None]) -> Callable[..., None]:
    """`_os_errors` for an AtomicWriter method, a full disk answered as the writer was told."""
    @functools.wraps(method)
    def wrapped(self: AtomicWriter, *args: bytes) -> None:
        try:
            with _os_errors():
                method(self, *args)
        except WorkspaceError as exc:
            if exc.status == 507 and self._full is not None:
                raise WorkspaceError(self._full.status, self._full.message) from exc
            raise
    return wrapped


def _fd_path(fd: int) -> str:
    """Where the kernel says `fd` is now, links resolved: the check no string trick can fool."""
    return os.readlink(f"/proc/self/fd/{fd}")


def filesystem_type(real: str, mountinfo: Iterable[str]) -> str:
    """The type of the filesystem holding the real path `real`: the longest mount point above it."""
    best, fstype = "", ""
    for line in mountinfo:
        fields = line.split()
        point = fields[4].replace("\\040", " ")
        if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, fstype = point, fields[fields.index("-") + 1]
    return fstype


def on_local_disk(path: Path) -> bool:
    try:
        with open("/proc/self/mountinfo") as mounts:
            fstype = filesystem_type(os.path.realpath(path), mounts)
    except OSError:
        return False
    return bool(fstype) and fstype.split(".")[0] not in NETWORK_FILESYSTEMS


def _read_if_cached(fd: int, size: int) -> bytes | None:
    """All `size` bytes of a regular file if the page cache holds them; None if any would wait."""
    buffer = bytearray(size + 1)  # one more: a file that grew is not taken as complete
    try:
        got = os.preadv(fd, [buffer], 0, os.RWF_NOWAIT)
    except OSError:  # EAGAIN: not cached; EOPNOTSUPP: a filesystem that cannot say
        return None
    return bytes(buffer[:got]) if got == size else None


def _reopen_for_reading(path_fd: int) -> BinaryIO:
    # Reopening an O_PATH descriptor through /proc opens exactly the file it names, so the
    # file checked is the file read, and no device is ever opened before it is checked.
    return open(f"/proc/self/fd/{path_fd}", "rb")


def _apply_ownership(fd: int, mode: int, owner: Owner | None) -> None:
    if owner is not None:
        os.fchown(fd, *owner)
    os.fchmod(fd, mode)


def _split_path(rel: str) -> list[str]:
    """The components of a workspace-relative path; a leading `/` means the root."""
    if "\x00" in rel or "\\" in rel:
        raise WorkspaceError(400, "path contains a NUL byte or a backslash")
    if not rel.isascii():
        try:  # a JSON body can carry lone surrogates, which no file name can hold
            rel.encode("utf-8")
        except UnicodeEncodeError:
            raise WorkspaceError(400, "path is not valid Unicode") from None
    parts = [part for part in rel.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise WorkspaceError(400, "path contains '..'")
    return parts


def _media_type(name: str, head: bytes, complete: bool) -> tuple[str, bool]:
    """(media type, serve as attachment) for a file called `name` that starts with `head`.

    `complete` says `head` is the whole file, so a multi-byte character cut at its end is
    an error rather than the start of the next chunk.
    """
    guessed = mimetypes.guess_type(name)[0]
    if guessed in IMAGE_TYPES:
        return guessed, False
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=complete)
        return TEXT_TYPE, False
    except UnicodeDecodeError:
        pass
    if guessed is None:
        return "application/octet-stream", True
    return guessed, not _is_inert(guessed)


def _is_inert(media: str) -> bool:
    """Whether a browser shows this type without running anything from the API's origin."""
    return media.startswith(("image/", "audio/", "video/")) or media in ("application/pdf", "text/plain")


@dataclass(frozen=True)
class FileInfo:
    path: Path  # the file's real path, inside the workspace when `read` checked it
    size: int
    media_type: str
    as_attachment: bool

    @_os_errors()
    def open(self) -> BinaryIO:
        """Open the checked file for reading, refusing if a link was swapped in since."""
        fd = os.open(self.path, os.O_PATH | os.O_CLOEXEC)
        try:
            if _fd_path(fd) != str(self.path) or not stat.S_ISREG(os.fstat(fd).st_mode):
                raise WorkspaceError(404, "the file changed while being read")
            return _reopen_for_reading(fd)
        finally:
            os.close(fd)


@dataclass(frozen=True)
class _Entry:
    """What a name in a folder is. For a link: what it leads to, known to be inside."""

    is_link: bool
    is_dir: bool
    mode: int
    target: str | None  # a link's resolved real path

    @property
    def is_folder(self) -> bool:
        """A real folder, not a link to one: removing it means removing a tree."""
        return self.is_dir and not self.is_link


class AtomicWriter:
    """A new version of one file, invisible until `commit` puts it in place whole.

    The bytes go to a temporary file in the user's temporary folder (`DATA_DIR/tmp/<user>/`:
    outside the workspace, so no user file can be mistaken for one, and on the same
    filesystem, so the final rename is atomic), owned and moded like the final file from the
    start. `close` ends the writing and gives back the descriptor, keeping only the temporary
    file's name: an upload of thousands of files holds one descriptor at a time. `commit`
    closes if needed, resolves the destination again (safely, as at opening) and renames the
    file over it, so a reader sees the old content or the new, never a mix. Used as a context
    manager it aborts unless committed. Thread-safe: an abort from another thread waits for a
    write in progress.
    """

    def __init__(self, temp_dir: Path, mode: int, owner: Owner | None,
                 place: Callable[[str], None], full: WorkspaceError | None = None) -> None:
        self._temp = str(temp_dir / f"{secrets.token_hex(8)}.tmp")
        self._place = place
        self._full = full  # the answer to a full disk, when not the server's DISK_FULL
        self._lock = threading.Lock()
        self._done = False
        fd = os.open(self._temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        self._file: BinaryIO | None = os.fdopen(fd, "wb")
        try:
            _apply_ownership(fd, mode, owner)
        except BaseException:
            self.abort()
            raise

    @_writer_errors
    def write(self, data: bytes) -> None:
        with self._lock:
            if self._file is None:
                raise ValueError("writer already closed")
            self._file.write(data)

    @_writer_errors
    def close(self) -> None:
        """No more bytes: flush them to disk and give back the descriptor."""
        with self._lock:
            self._close_file()

    def _close_file(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            try:
                file.flush()
                os.fsync(file.fileno())
            finally:
                file.close()

    @_writer_errors
    def sync(self) -> None:
        """Everything written on disk and the writing ended (a full disk shows here at the
        latest); aborts on failure."""
        try:
            self.close()
        except BaseException:
            self.abort()
            raise

    @_writer_errors
    def commit(self) -> None:
        with self._lock:
            if self._done:
                raise ValueError("writer already finished")
            try:
                self._close_file()
                self._place(self._temp)
            except BaseException:
                self._discard()
                raise
            self._done = True

    def abort(self) -> None:
        with self._lock:
            self._discard()

    @property
    def size(self) -> int:
        """The bytes written so far."""
        return os.stat(self._temp).st_size

    def _discard(self) -> None:
        if self._done:
            return
        self._done = True
        file, self._file = self._file, None
        if file is not None:
            with suppress(OSError):  # closing flushes what is buffered, which fails again on a full disk
                file.close()
        with suppress(FileNotFoundError):
            os.unlink(self._temp)

    def __enter__(self) -> AtomicWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.abort()


@dataclass
class Listing:
    """A workspace's entries, and whether `MAX_LISTED_ENTRIES` cut them short."""

    files: list[str]
    truncated: bool = False

    @cached_property
    def json(self) -> bytes:
        """`{"files": [...]}` (plus `"truncated": true` when cut short), encoded once per listing."""
        body: dict = {"files": self.files}
        if self.truncated:
            body |= {"truncated": True, "limit": MAX_LISTED_ENTRIES}
        return json.dumps(body).encode()


class _ListCache:
    """The last listing of a workspace, fresh for `ttl` seconds or until a change."""

    def __init__(self, ttl: float) -> None:
        self._ttl = ttl
        self._lock = threading.Lock()
        # One listing at a time per workspace: the polls that queue behind it get its result.
        self._scan_lock = threading.Lock()
        self._value: Listing | None = None
        self._taken = 0.0
        self._generation = 0

    def get(self, scan: Callable[[], Listing]) -> Listing:
        with self._scan_lock:
            with self._lock:
                if self._value is not None and time.monotonic() - self._taken < self._ttl:
                    return self._value
                generation = self._generation
            value = scan()
            value.json  # noqa: B018 - encoded here, in a worker thread, so that `fresh` never encodes
            with self._lock:
                # A change made during the scan may be missing from it: don't keep it.
                if generation == self._generation:
                    self._value, self._taken = value, time.monotonic()
            return value

    def fresh(self) -> Listing | None:
        """The cached listing if it is still fresh; never scans, never waits for a scan."""
        with self._lock:
            if self._value is not None and time.monotonic() - self._taken < self._ttl:
                return self._value
        return None

    def invalidate(self) -> None:
        with self._lock:
            self._generation += 1
            self._value = None


class Workspace:
    """One user's workspace; get it from `Workspaces.for_user`."""

    def __init__(self, root: Path, owner: Owner | None, list_ttl: float, temp_dir: Path,
                 quota_bytes: int = 0, own_disk: bool = False) -> None:
        self.root = root
        self.temp_dir = temp_dir
        self.quota_bytes = quota_bytes  # 0: no quota
        # On a filesystem of its own (WORKSPACE_DISKS) that filesystem full is the quota reached.
        self._full = WorkspaceError(413, self._over_quota()) if own_disk else None
        self._root_real = os.path.realpath(root)
        self._owner = owner
        self._listing = _ListCache(list_ttl)
        self.on_local_disk = on_local_disk(root)

    # --- the operations ---

    def list_files(self) -> list[str]:
        """Every entry, relative and sorted, folders ending in `/`; links are not descended.

        The list is shared with other callers until the cache expires: don't modify it.
        """
        return self.listing().files

    def listing(self) -> Listing:
        """`list_files` with its truncation flag: at most MAX_LISTED_ENTRIES, shallowest first."""
        return self._listing.get(self._scan)

    def fresh_listing(self) -> Listing | None:
        """The last listing while it is fresh, at no cost: a poll answered without a thread."""
        return self._listing.fresh()

    @_os_errors()
    def read(self, rel: str) -> FileInfo:
        with self._regular_file(_split_path(rel)) as (fd, status):
            real = _fd_path(fd)
            with _reopen_for_reading(fd) as file:
                head = file.read(SNIFF_BYTES)
        media, attachment = _media_type(real, head, complete=len(head) < SNIFF_BYTES)
        return FileInfo(Path(real), status.st_size, media, attachment)

    @_os_errors()
    def read_cached(self, rel: str, limit: int) -> tuple[FileInfo, bytes] | None:
        """A small file's info and content without waiting for a disk, else None (read it
        with `read` in a worker): when it is larger than `limit`, deeper than
        CACHED_READ_DEPTH, on a network filesystem, or not wholly in the page cache. Local
        lookups of cached folders take microseconds each."""
        parts = _split_path(rel)
        if not self.on_local_disk or len(parts) > CACHED_READ_DEPTH:
            return None
        with self._regular_file(parts) as (fd, status):
            if status.st_size > limit:
                return None
            real = _fd_path(fd)
            with _reopen_for_reading(fd) as file:
                data = _read_if_cached(file.fileno(), status.st_size)
        if data is None:
            return None
        media, attachment = _media_type(real, data, complete=True)
        return FileInfo(Path(real), len(data), media, attachment), data

    @contextmanager
    def _regular_file(self, parts: list[str]) -> Iterator[tuple[int, os.stat_result]]:
        """An O_PATH descriptor of the regular file `parts` leads to, and its status; 404 else."""
        with self._parent_of(parts) as (parent, name):
            fd = self._open_target(parent, name)
        try:
            status = os.fstat(fd)
            if not stat.S_ISREG(status.st_mode):
                raise WorkspaceError(404, "not a file")
            yield fd, status
        finally:
            os.close(fd)

    @_os_errors()
    def open_writer(self, rel: str, make_parents: bool = False, created: list[str] | None = None) -> AtomicWriter:
        """A writer that replaces (or creates) the file; a link inside is written through.

        Folders this makes (with `make_parents`) are appended to `created`, parents first.
        """
        parts = _split_path(rel)
        with self._write_target(parts, make_parents, created) as (parent, name, entry):
            if entry is not None and entry.is_dir:
                raise WorkspaceError(400, "that is a folder")
            # Replacing a file keeps its permissions, so a script stays executable.
            mode = entry.mode if entry is not None else FILE_MODE
        return AtomicWriter(self.temp_dir, mode, self._owner,
                            lambda temp: self._place(temp, parts, make_parents, created), self._full)

    def _place(self, temp: str, parts: list[str], make_parents: bool, created: list[str] | None) -> None:
        """Rename a finished temporary file over the destination, resolved afresh."""
        with self._write_target(parts, make_parents, created) as (parent, name, entry):
            if entry is not None and entry.is_dir:
                raise WorkspaceError(400, "that is a folder")
            if self.quota_bytes:
                replaced = os.stat(name, dir_fd=parent, follow_symlinks=False).st_size if entry else 0
                self.check_room(os.stat(temp).st_size - replaced)
            os.replace(temp, name, dst_dir_fd=parent)
            os.fsync(parent)  # makes the rename itself survive a crash
        self._listing.invalidate()

    @contextmanager
    def _write_target(self, parts: list[str], make_parents: bool,
                      created: list[str] | None) -> Iterator[tuple[int, str, _Entry | None]]:
        """(parent descriptor, name, what is there) of the file a write to `parts` replaces."""
        with self._parent_of(parts, create=make_parents, created=created) as (parent, name):
            entry = self._probe(parent, name)
            if entry is None or not entry.is_link or entry.is_dir:
                yield parent, name, entry
                return
        assert entry.target is not None
        with self._parent_of(self._relative(entry.target)) as (parent, name):
            entry = self._probe(parent, name)
            if entry is not None and entry.is_link:
                raise WorkspaceError(400, "a link changed while being written through")
            yield parent, name, entry

    def usage(self) -> int:
        """The bytes of the workspace's files (links not followed)."""
        total = 0
        for folder, _, files in os.walk(self.root):  # os.walk descends no link
            for name in files:
                with suppress(OSError):
                    total += os.lstat(os.path.join(folder, name)).st_size
        return total

    def check_room(self, extra: int) -> None:
        """413 when `extra` more bytes would pass WORKSPACE_QUOTA_MB (checked before writing)."""
        if self.quota_bytes and extra > 0 and self.usage() + extra > self.quota_bytes:
            raise WorkspaceError(413, self._over_quota())

    def _over_quota(self) -> str:
        return f"this would pass the workspace quota of {self.quota_bytes // 2**20} MB"

    def remove_empty_folders(self, folders: list[str]) -> None:
        """Undo `created`: remove each folder, deepest first, if it is still an empty folder."""
        for rel in reversed(folders):
            try:
                with self._parent_of(_split_path(rel)) as (parent, name):
                    os.rmdir(name, dir_fd=parent)  # refuses links, files and non-empty folders
            except (OSError, WorkspaceError):
                pass
        self._listing.invalidate()

    @_os_errors()
    def create(self, rel: str) -> None:
        """An empty file, or a folder when `rel` ends in `/`; missing parents are created."""
        want_folder = rel.endswith("/")
        with self._parent_of(_split_path(rel), create=True) as (parent, name):
            entry = self._probe(parent, name)
            if entry is not None:
                if entry.is_dir == want_folder:
                    raise WorkspaceError(400, "already exists")
                raise WorkspaceError(409, f"a {'file' if want_folder else 'folder'} of that name exists")
            if want_folder:
                os.close(self._new_folder(parent, name))
            else:
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                             0o600, dir_fd=parent)
                try:
                    _apply_ownership(fd, FILE_MODE, self._owner)
                finally:
                    os.close(fd)
        self._listing.invalidate()

    @_os_errors()
    def delete(self, rel: str) -> None:
        """A file, a link (never what it points to) or a whole folder tree."""
        parts = _split_path(rel)
        if not parts:
            raise WorkspaceError(400, "cannot delete the workspace itself")
        with self._parent_of(parts) as (parent, name):
            entry = self._probe(parent, name)
            if entry is None:
                raise WorkspaceError(404, "no such file or folder")
            self._remove(parent, name, entry)
        self._listing.invalidate()

    @_os_errors()
    def move(self, source: str, destination: str, overwrite: bool = False) -> None:
        src_parts, dst_parts = _split_path(source), _split_path(destination)
        if not src_parts or not dst_parts:
            raise WorkspaceError(400, "source and destination are required")
        # Checked before any missing destination folder is created.
        if dst_parts[: len(src_parts)] == src_parts:
            raise WorkspaceError(400, "cannot move something into itself")
        with self._parent_of(src_parts) as (src_parent, src_name):
            src = self._probe(src_parent, src_name)
            if src is None:
                raise WorkspaceError(404, "source not found")
            with self._parent_of(dst_parts, create=True) as (dst_parent, dst_name):
                src_real = f"{_fd_path(src_parent)}/{src_name}"
                dst_real = f"{_fd_path(dst_parent)}/{dst_name}"
                # The same check on real paths, for a destination reached through a link.
                if dst_real == src_real or dst_real.startswith(src_real + "/"):
                    raise WorkspaceError(400, "cannot move something into itself")
                dst = self._probe(dst_parent, dst_name)
                if dst is not None:
                    if not overwrite:
                        raise WorkspaceError(409, "destination exists")
                    # rename() replaces a file atomically, but not a folder nor by a folder.
                    if src.is_folder or dst.is_folder:
                        self._remove(dst_parent, dst_name, dst)
                os.rename(src_name, dst_name, src_dir_fd=src_parent, dst_dir_fd=dst_parent)
        self._listing.invalidate()

    @_os_errors()
    def download(self, rel: str) -> tuple[str, BinaryIO]:
        """(file name, open file) to send: a file as it is, a folder (or the root) as a zip.

        The zip is written to an anonymous temporary file first (the caller runs this in an
        executor and then streams it), so memory stays flat whatever the folder's size.
        Links inside the folder are left out: a zip of them would be a way to read outside.
        """
        parts = _split_path(rel)
        if parts:
            with self._parent_of(parts) as (parent, name):
                entry = self._probe(parent, name)
                if entry is None:
                    raise WorkspaceError(404, "no such file or folder")
                if not entry.is_dir:
                    return name, self.read(rel).open()
        fd = self._open_folder(parts, create=False)
        try:
            out = tempfile.TemporaryFile()  # noqa: SIM115 - handed to the caller, who closes it
            try:
                with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, allowZip64=True) as archive:
                    _zip_folder(archive, fd, "")
                out.seek(0)
            except BaseException:
                out.close()
                raise
        finally:
            os.close(fd)
        return (parts[-1] if parts else "workspace") + ".zip", out

    # --- path resolution ---

    def _inside(self, real: str) -> bool:
        return real == self._root_real or real.startswith(self._root_real + "/")

    def _relative(self, real: str) -> list[str]:
        return real[len(self._root_real) + 1:].split("/") if real != self._root_real else []

    @contextmanager
    def _parent_of(self, parts: list[str], create: bool = False,
                   created: list[str] | None = None) -> Iterator[tuple[int, str]]:
        """(descriptor of the checked parent folder, final name); missing folders made on
        request, and named in `created` when given."""
        if not parts:
            raise WorkspaceError(400, "a file path is required")
        fd = self._open_folder(parts[:-1], create, created)
        try:
            yield fd, parts[-1]
        finally:
            os.close(fd)

    def _open_folder(self, parts: list[str], create: bool, created: list[str] | None = None) -> int:
        fd = os.open(self._root_real, _FOLDER_FLAGS)
        try:
            for depth, name in enumerate(parts):
                child, made = self._open_child_folder(fd, name, create)
                if made and created is not None:
                    created.append("/".join(parts[: depth + 1]))
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _open_child_folder(self, parent: int, name: str, create: bool) -> tuple[int, bool]:
        """(descriptor, whether this call made the folder)."""
        made = False
        try:
            fd = os.open(name, _FOLDER_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                raise WorkspaceError(404, "folder not found") from None
            fd, made = self._make_or_open_folder(parent, name)
        except NotADirectoryError:
            raise WorkspaceError(409 if create else 404, f"{name!r} is not a folder") from None
        if not self._inside(_fd_path(fd)):
            os.close(fd)
            raise WorkspaceError(400, OUTSIDE)
        return fd, made

    def _make_or_open_folder(self, parent: int, name: str) -> tuple[int, bool]:
        try:
            return self._new_folder(parent, name), True
        except FileExistsError:
            pass  # made meanwhile by a concurrent request, or a link that leads nowhere
        try:
            return os.open(name, _FOLDER_FLAGS, dir_fd=parent), False
        except FileNotFoundError:
            raise WorkspaceError(400, OUTSIDE) from None

    def _new_folder(self, parent: int, name: str) -> int:
        os.mkdir(name, dir_fd=parent)
        fd = os.open(name, _FOLDER_FLAGS | os.O_NOFOLLOW, dir_fd=parent)
        try:
            _apply_ownership(fd, FOLDER_MODE, self._owner)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _open_target(self, parent: int, name: str) -> int:
        """An O_PATH descriptor of what `name` leads to, links followed, checked to be inside."""
        fd = os.open(name, os.O_PATH | os.O_CLOEXEC, dir_fd=parent)
        if not self._inside(_fd_path(fd)):
            os.close(fd)
            raise WorkspaceError(400, OUTSIDE)
        return fd

    def _probe(self, parent: int, name: str) -> _Entry | None:
        """What `name` is, or None; a link that leads outside or nowhere is refused (400)."""
        try:
            status = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if not stat.S_ISLNK(status.st_mode):
            return _Entry(False, stat.S_ISDIR(status.st_mode), stat.S_IMODE(status.st_mode), None)
        try:
            fd = self._open_target(parent, name)
        except FileNotFoundError:
            raise WorkspaceError(400, "link leads nowhere") from None
        try:
            target = os.fstat(fd)
            return _Entry(True, stat.S_ISDIR(target.st_mode), stat.S_IMODE(target.st_mode), _fd_path(fd))
        finally:
            os.close(fd)

    # --- helpers of the operations ---

    @staticmethod
    def _remove(parent: int, name: str, entry: _Entry) -> None:
        if entry.is_folder:
            shutil.rmtree(name, dir_fd=parent)  # fd-based: never follows a link, even a swapped-in one
        else:
            os.unlink(name, dir_fd=parent)

    def _scan(self) -> Listing:
        # Breadth first, so that a listing cut short keeps the entries nearest the root.
        found: list[str] = []
        pending = deque([""])
        while pending:
            if len(found) > MAX_LISTED_ENTRIES:
                break
            folder = pending.popleft()
            fd = self._open_exact_folder(folder)
            if fd is None:
                continue
            try:
                with os.scandir(fd) as entries:
                    for entry in entries:
                        if len(found) > MAX_LISTED_ENTRIES:
                            break
                        rel = folder + entry.name
                        if entry.is_symlink():
                            suffix = self._link_suffix(fd, entry.name)
                            if suffix is not None:
                                found.append(rel + suffix)
                        elif entry.is_dir(follow_symlinks=False):
                            found.append(rel + "/")
                            pending.append(rel + "/")
                        else:
                            found.append(rel)
            finally:
                os.close(fd)
        truncated = len(found) > MAX_LISTED_ENTRIES
        if truncated:
            del found[MAX_LISTED_ENTRIES:]
        found.sort()
        return Listing(found, truncated)

    def _open_exact_folder(self, folder: str) -> int | None:
        """The folder at `folder`, or None if it went away or a link was swapped in for it."""
        expected = os.path.join(self._root_real, folder).rstrip("/")
        try:
            fd = os.open(expected, _FOLDER_FLAGS)
        except OSError:
            return None
        if _fd_path(fd) != expected:
            os.close(fd)
            return None
        return fd

    def _link_suffix(self, parent: int, name: str) -> str | None:
        """The listing's suffix for a link: `/` to a folder inside, empty to a file inside,
        None when it leads outside or nowhere (such links are not listed)."""
        try:
            fd = self._open_target(parent, name)
        except (OSError, WorkspaceError):
            return None
        try:
            return "/" if stat.S_ISDIR(os.fstat(fd).st_mode) else ""
        finally:
            os.close(fd)


def _zip_folder(archive: zipfile.ZipFile, folder_fd: int, prefix: str) -> None:
    """Add a folder's files and folders to `archive` under `prefix`, never following a link."""
    with os.scandir(folder_fd) as entries:
        names = sorted((entry.name, entry.is_dir(follow_symlinks=False), entry.is_file(follow_symlinks=False))
                       for entry in entries)
    for name, is_dir, is_file in names:
        if is_dir:
            try:
                child = os.open(name, _FOLDER_FLAGS | os.O_NOFOLLOW, dir_fd=folder_fd)
            except OSError:  # removed or swapped for a link meanwhile
                continue
            try:
                archive.writestr(zipfile.ZipInfo(prefix + name + "/"), b"")
                _zip_folder(archive, child, prefix + name + "/")
            finally:
                os.close(child)
        elif is_file:
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder_fd)
            except OSError:
                continue
            with os.fdopen(fd, "rb") as source:
                status = os.fstat(source.fileno())
                if not stat.S_ISREG(status.st_mode):
                    continue
                stamp = time.localtime(max(status.st_mtime, 315532800 + 86400))[:6]  # zip starts in 1980
                info = zipfile.ZipInfo(prefix + name, stamp)
                info.external_attr = (status.st_mode & 0xFFFF) << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                with archive.open(info, "w", force_zip64=True) as target:
                    shutil.copyfileobj(source, target, 256 * 1024)


class Workspaces:
    """Hands out each user's `Workspace`, creating its folder once, and keeps it (and its cache)
    while it is in use or was used lately.

    A workspace nobody has asked for over a whole period of `forget_idle` is let go, so that the
    server holds the people working now rather than everyone who ever signed in. One still
    referenced (an upload, a writer, an operation in a worker thread) is found again by
    `for_user`: there is never a second `Workspace` for one user.
    """

    def __init__(self, base_dir: Path, owner: Owner | None = None, list_ttl: float = 0.25,
                 quota_bytes: int = 0, disks: WorkspaceDisks | None = None) -> None:
        self.base_dir = base_dir
        self.quota_bytes = quota_bytes
        self.disks = disks  # WORKSPACE_DISKS: each workspace a filesystem of its own
        # Beside the workspaces (DATA_DIR/tmp), so that renames into them stay on one filesystem.
        self.temp_base = base_dir.parent / "tmp"
        self._owner = owner
        self._list_ttl = list_ttl
        self._lock = threading.Lock()
        self._live: weakref.WeakValueDictionary[str, Workspace] = weakref.WeakValueDictionary()
        self._recent: dict[str, Workspace] = {}  # used in this period (strong references)
        self._before: dict[str, Workspace] = {}  # used in the period before

    @_os_errors()
    def for_user(self, user_id: str) -> Workspace:
        with self._lock:
            workspace = self._live.get(user_id)
            if workspace is None:
                root = self._make_root(user_id)
                files, temp, own_disk = self._storage(root)
                workspace = Workspace(files, self._owner, self._list_ttl, self._make_temp_dir(temp),
                                      self.quota_bytes, own_disk)
                self._live[user_id] = workspace
            self._recent[user_id] = workspace
            return workspace

    def loaded(self, user_id: str) -> Workspace | None:
        """The user's workspace if `for_user` made it already; never touches the disk."""
        workspace = self._live.get(user_id)
        if workspace is not None:
            self._recent[user_id] = workspace  # one dict write: atomic, no lock needed
        return workspace

    def forget_idle(self) -> None:
        """Start a new period: workspaces not used since the previous call are let go."""
        with self._lock:
            self._before, self._recent = self._recent, {}

    def _storage(self, root: Path) -> tuple[Path, Path, bool]:
        """Where the server works on workspace `root`, where its temporary files go, and
        whether that is a filesystem of the workspace's own."""
        if self.disks is not None:
            try:
                disk = self.disks.ensure(root)
                return disk.files, disk.temp, True
            except DiskError as exc:
                if self.disks.image_of(root).exists():  # made, but cannot be mounted: its files are in it
                    raise WorkspaceError(507, "the workspace's filesystem cannot be mounted") from exc
                log.error("%s; serving it without one, so terminal writes are not held to the quota", exc)
        return root, self.temp_base / root.name, False

    def remove(self, user_id: str) -> None:
        """Delete the user's workspace and temporary folder (links inside are not followed)."""
        with self._lock:
            for held in (self._live, self._recent, self._before):
                held.pop(user_id, None)
            if user_id in ("", ".", "..") or "/" in user_id or "\\" in user_id or "\x00" in user_id:
                raise WorkspaceError(400, f"bad user id: {user_id!r}")
            if self.disks is not None:
                self.disks.remove(self.base_dir / user_id)
            shutil.rmtree(self.base_dir / user_id, ignore_errors=True)
            shutil.rmtree(self.temp_base / user_id, ignore_errors=True)

    @staticmethod
    def _make_temp_dir(temp: Path) -> Path:
        """The user's temporary folder, emptied of what an earlier run left half-written.

        Only the server uses it (it is not in the workspace, nor in the container), so plain
        paths are safe in it.
        """
        shutil.rmtree(temp, ignore_errors=True)
        temp.mkdir(mode=0o700, parents=True)
        return temp

    def _make_root(self, user_id: str) -> Path:
        if user_id in ("", ".", "..") or "/" in user_id or "\\" in user_id or "\x00" in user_id:
            raise WorkspaceError(400, f"bad user id: {user_id!r}")
        self.base_dir.mkdir(parents=True, exist_ok=True)
        root = self.base_dir / user_id
        try:
            root.mkdir()
        except FileExistsError:
            return root
        fd = os.open(root, _FOLDER_FLAGS | os.O_NOFOLLOW)
        try:
            _apply_ownership(fd, FOLDER_MODE, self._owner)
        finally:
            os.close(fd)
        return root
