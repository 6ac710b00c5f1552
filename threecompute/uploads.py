"""One multipart upload request as a batch: every file lands, or none does.

The parser streams each file part into its own temporary file as the bytes arrive, and that
file is closed when its part ends, so a batch holds one descriptor however many files it
carries. The batch holds back the renames until the whole body has been read and parsed, so
a request that fails half-way (a bad name in the tenth file, a client that hangs up) changes
nothing: its temporary files are removed, and so are the folders it made, if still empty.
"""

from __future__ import annotations

import posixpath
import threading

from .multipart import Discard, MultipartParser
from .workspace import AtomicWriter, Workspace, WorkspaceError

FILE_FIELD = "files"
MAX_FILES = 5000  # each costs a temporary file (not a descriptor) until the batch lands


class _HeldWriter:
    """Writes through at once; the part's end only closes the file, ready for the batch."""

    def __init__(self, writer: AtomicWriter) -> None:
        self.writer = writer

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    def commit(self) -> None:
        self.writer.close()

    def abort(self) -> None:
        self.writer.abort()


class UploadBatch:
    """Thread-safe: `abort` from one thread waits for a `feed` in progress in another."""

    def __init__(self, workspace: Workspace, boundary: bytes, keep_folders: bool) -> None:
        self.workspace = workspace
        self.keep_folders = keep_folders
        self.parser = MultipartParser(boundary, self._open_file)
        self._held: list[_HeldWriter] = []
        self._created: list[str] = []  # folders this batch made, parents first
        self._lock = threading.Lock()

    def _open_file(self, field: str, filename: str) -> _HeldWriter | Discard:
        if field != FILE_FIELD:
            return Discard()
        if len(self._held) >= MAX_FILES:
            raise WorkspaceError(400, f"at most {MAX_FILES} files per upload")
        name = filename if self.keep_folders else base_name(filename)
        if not name:
            raise WorkspaceError(400, "an uploaded file has no name")
        writer = self.workspace.open_writer(name, make_parents=self.keep_folders, created=self._created)
        held = _HeldWriter(writer)
        self._held.append(held)
        return held

    def feed(self, chunk: bytes) -> None:
        with self._lock:
            self.parser.feed(chunk)

    def finish(self) -> int:
        """Parse the end of the body and put every file in place; returns how many."""
        with self._lock:
            self.parser.finish()
            if not self._held:
                raise WorkspaceError(400, f"no files in the '{FILE_FIELD}' field")
            for held in self._held:  # every file on disk first: a full disk fails the batch, not half of it
                held.writer.sync()
            # Judged whole, before any file lands (the files they replace are not deducted).
            self.workspace.check_room(sum(held.writer.size for held in self._held))
            for held in self._held:
                held.writer.commit()
            return len(self._held)

    def abort(self) -> None:
        with self._lock:
            self.parser.abort()
            for held in self._held:
                held.abort()
            if self._created:
                self.workspace.remove_empty_folders(self._created)
                self._created.clear()

    def field(self, name: str) -> str | None:
        values = self.parser.fields.get(name)
        return values[-1] if values else None


def base_name(filename: str) -> str:
    """The last part of a browser-sent filename (some send `C:\\fakepath\\x.txt`)."""
    return posixpath.basename(filename.replace("\\", "/"))
