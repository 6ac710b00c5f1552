"""The file API: list, upload, move, and read/write/create/delete one path.

All path handling lives in the workspace layer; these handlers only parse requests, run the
workspace call in the file executor, and answer. Bodies that can be large (uploads, PUT)
are streamed: chunks are written to a temporary file as they arrive (a fast sender's up to
256 KiB at a time), and Tornado reads the next chunk only once that write is done. A user
has at most MAX_UPLOADS_PER_USER of them in flight (429 beyond), and a sender that goes
quiet for UPLOAD_IDLE_SECONDS is cut off.
"""

from __future__ import annotations

import fcntl
import logging
import struct
import termios
import time
import urllib.parse
from collections.abc import Callable
from typing import Any, BinaryIO, TypeVar

import tornado.web
from tornado.ioloop import IOLoop

from ..containers.backend import BackendError, UserRef
from ..limits import MAX_UPLOADS_PER_USER
from ..multipart import MultipartError, MultipartParser
from ..uploads import UploadBatch
from ..workspace import AtomicWriter, FileInfo, Workspace, WorkspaceError
from .base import UNSAFE_METHODS, BaseHandler, HTTPError

log = logging.getLogger("threecompute.files")
T = TypeVar("T")
MAX_UPLOAD_BYTES = 10 * 1024**3
UPLOAD_BODY_TIMEOUT_SECONDS = 6 * 3600.0  # a whole upload body (10 GiB at 0.5 MB/s)
UPLOAD_IDLE_SECONDS = 60.0  # no byte of an upload body for this long ends the connection
# On every file answer: an SVG renders in <img>, but opened as a page it runs no script
# (sandbox) and loads nothing (default-src); inline style is all an SVG needs to draw.
FILE_CSP = "default-src 'none'; style-src 'unsafe-inline'; sandbox"
READ_CHUNK_BYTES = 256 * 1024
# While more of a body is already waiting, its chunks (64 KiB reads) go to a worker together:
# a trip per 256 KiB, not one per read, doubled the upload rate.
WRITE_BATCH_BYTES = 256 * 1024
SMALL_FILE_BYTES = 64 * 1024  # read on the loop when the page cache holds all of it


class WorkspaceHandler(BaseHandler):
    def prepare(self) -> None:
        super().prepare()
        # Before any body is parsed: no session is 401, too many requests 429, whatever else is wrong.
        self.limit("files", self.require_identity().user_id)

    async def workspace(self) -> Workspace:
        identity = self.require_identity()
        return await self.in_executor(self.services.workspaces.for_user, identity.user_id)

    async def on_workspace(self, operation: Callable[..., T], *args: Any) -> T:
        """`operation(workspace, *args)` in one trip to the file executor (the hot paths)."""
        workspaces, user_id = self.services.workspaces, self.require_identity().user_id
        return await self.in_executor(lambda: operation(workspaces.for_user(user_id), *args))

    def on_finish(self) -> None:
        # Any successful write: the user's open workspaces refresh their file tree.
        if self.request.method in UNSAFE_METHODS and self.get_status() < 400 and self.current_user is not None:
            self.services.hub.files.changed(self.current_user.user_id)


class ListFilesHandler(WorkspaceHandler):
    async def get(self) -> None:
        # The frontend polls every 300 ms: a fresh cached listing is answered on the loop.
        workspace = self.services.workspaces.loaded(self.require_identity().user_id)
        listing = workspace.fresh_listing() if workspace is not None else None
        if listing is None:
            # Scanned and encoded in a worker (4 MB of JSON is tens of ms), once per cached listing.
            listing = await self.on_workspace(Workspace.listing)
        self.finish(listing.json)


class UploadBodyMixin(WorkspaceHandler):
    """An authenticated streamed body: the user's upload slot, a large limit, an idle watchdog."""

    _slot_user: str | None = None
    _watchdog: object | None = None
    _last_chunk = 0.0
    _held: list[bytes] | None = None
    _held_bytes = 0

    def check_body_length(self) -> None:
        pass  # judged by start_upload_body, after authentication; until then nothing is read

    def start_upload_body(self) -> None:
        user_id = self.require_identity().user_id
        if not self.services.limits.take_upload(user_id):
            raise HTTPError(429, f"too many uploads in progress: at most {MAX_UPLOADS_PER_USER} at once")
        self._slot_user = user_id
        self.allow_body(MAX_UPLOAD_BYTES)
        self.request.connection.set_body_timeout(UPLOAD_BODY_TIMEOUT_SECONDS)
        self.chunk_arrived()
        self._watchdog = IOLoop.current().call_later(UPLOAD_IDLE_SECONDS, self._check_idle)

    def chunk_arrived(self) -> None:
        self._last_chunk = time.monotonic()

    def chunks_to_write(self, chunk: bytes | None) -> list[bytes]:
        """What to hand a worker now: every chunk held, unless more of the body is waiting
        to be read and less than WRITE_BATCH_BYTES are held; at the end (`chunk` None), the rest."""
        held = self._held if self._held is not None else []
        if chunk is not None:
            held.append(chunk)
            self._held_bytes += len(chunk)
            if self._held_bytes < WRITE_BATCH_BYTES and self._body_waiting():
                self._held = held
                return []
        self._held, self._held_bytes = None, 0
        return held

    def _body_waiting(self) -> bool:
        """Whether the kernel holds bytes of this connection not read yet (a fast sender)."""
        try:
            fd = self.request.connection.stream.socket.fileno()
            return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0] > 0
        except (AttributeError, OSError):  # closed meanwhile
            return False

    def body_done(self) -> None:
        if self._watchdog is not None:
            IOLoop.current().remove_timeout(self._watchdog)
            self._watchdog = None

    def _check_idle(self) -> None:
        quiet = time.monotonic() - self._last_chunk
        if quiet < UPLOAD_IDLE_SECONDS:
            self._watchdog = IOLoop.current().call_later(UPLOAD_IDLE_SECONDS - quiet, self._check_idle)
            return
        self._watchdog = None
        log.info("upload body idle for %.0f s: closing the connection", quiet)
        self.request.connection.close()  # on_connection_close cleans up

    def end_upload(self) -> None:
        self.body_done()
        user_id, self._slot_user = self._slot_user, None
        if user_id is not None:
            self.services.limits.release_upload(user_id)

    def on_finish(self) -> None:
        self.end_upload()
        super().on_finish()

    def on_connection_close(self) -> None:
        super().on_connection_close()  # fails the body future, so the request ends
        self.end_upload()


def write_all(write: Callable[[bytes], None], chunks: list[bytes]) -> None:
    for chunk in chunks:
        write(chunk)


def land(writer: AtomicWriter, chunks: list[bytes]) -> None:
    """The last chunks of a body, then the file in its place; on failure, nothing is left."""
    with writer:
        write_all(writer.write, chunks)
        writer.commit()


def land_batch(batch: UploadBatch, chunks: list[bytes]) -> int:
    """The last chunks of a multipart body, then every file in its place; returns how many."""
    write_all(batch.feed, chunks)
    return batch.finish()


class MoveHandler(WorkspaceHandler):
    async def post(self) -> None:
        body = self.json_body()
        source, destination, overwrite = body.get("source"), body.get("destination"), body.get("overwrite", False)
        if not isinstance(source, str) or not source or not isinstance(destination, str) or not destination:
            raise HTTPError(400, "source and destination must be non-empty strings")
        if not isinstance(overwrite, bool):
            raise HTTPError(400, "overwrite must be true or false")
        await self.on_workspace(Workspace.move, source, destination, overwrite)
        self.answer({"success": True})


@tornado.web.stream_request_body
class UploadHandler(UploadBodyMixin):
    """POST /upload (files at the root, by base name) and /upload-folder (relative paths)."""

    keep_folders = False
    batch: UploadBatch | None = None
    failure: Exception | None = None

    async def prepare(self) -> None:
        super().prepare()
        self.start_upload_body()
        workspace = await self.workspace()
        try:
            boundary = MultipartParser.boundary_from_content_type(self.request.headers.get("Content-Type", ""))
        except MultipartError as exc:
            raise HTTPError(400, f"expected multipart/form-data: {exc}") from None
        self.batch = UploadBatch(workspace, boundary, self.keep_folders)

    async def data_received(self, chunk: bytes) -> None:
        self.chunk_arrived()
        # After a failure, read and drop the rest, so the client gets the error instead of a reset.
        if self.failure is None:
            await self._feed(self.chunks_to_write(chunk))
        self.chunk_arrived()  # a slow disk is not a slow sender

    async def _feed(self, chunks: list[bytes]) -> None:
        batch = self.batch  # the connection's close may take it meanwhile
        if not chunks or batch is None:
            return
        try:
            await self.in_executor(write_all, batch.feed, chunks)
        except (MultipartError, WorkspaceError) as exc:
            self.failure = exc
            await self.in_executor(batch.abort)

    async def post(self) -> None:
        self.body_done()
        if self.failure is not None:
            raise self.failure
        batch, self.batch = self.batch, None  # the whole body is here: a client leaving now cannot undo it
        if batch is None:
            return  # the client left in between
        try:
            count = await self.in_executor(land_batch, batch, self.chunks_to_write(None))
        except (MultipartError, WorkspaceError):
            await self.in_executor(batch.abort)
            raise
        await self.after_upload(batch)
        self.answer({"success": True, "files": count})

    async def after_upload(self, batch: UploadBatch) -> None:
        pass

    def on_connection_close(self) -> None:
        batch, self.batch = self.batch, None
        if batch is not None:  # the client left before the whole body came
            self.services.file_executor.submit(batch.abort)
        super().on_connection_close()

    def _handle_request_exception(self, e: BaseException) -> None:
        if isinstance(e, MultipartError):
            e = upload_error(e)
        super()._handle_request_exception(e)


def upload_error(exc: MultipartError) -> HTTPError:
    if exc.status == 413:
        return HTTPError(413, f"upload too large: {exc}")
    return HTTPError(400, f"malformed upload: {exc}")


class UploadFolderHandler(UploadHandler):
    keep_folders = True

    async def after_upload(self, batch: UploadBatch) -> None:
        folder = batch.field("move-into")
        if folder:
            user = await self.require_user()
            # The answer need not wait for the terminals; a failure is only logged.
            IOLoop.current().spawn_callback(self._cd_all_tabs, self.services.user_ref(user), folder)

    async def _cd_all_tabs(self, user: UserRef, folder: str) -> None:
        try:
            await self.services.backend.cd_all_tabs(user, folder.strip("/"))
        except BackendError as exc:
            log.warning("move-into %r for %s failed: %s", folder, user.user_id, exc)


@tornado.web.stream_request_body
class FileHandler(UploadBodyMixin):
    """GET, PUT (streamed, atomic), POST (create) and DELETE on one workspace path."""

    writer: AtomicWriter | None = None
    failure: WorkspaceError | None = None

    async def prepare(self) -> None:
        super().prepare()
        if self.request.method == "PUT":
            self.start_upload_body()
            workspace = await self.workspace()
            self.writer = await self.in_executor(workspace.open_writer, self.path_argument())

    def path_argument(self) -> str:
        path = self.path_args[0] if self.path_args else ""
        if not path:
            raise HTTPError(400, "a file path is required")
        return path

    async def data_received(self, chunk: bytes) -> None:
        self.chunk_arrived()
        if self.writer is not None:  # after a failure: read and drop the rest, so the client gets the error
            await self._write(self.chunks_to_write(chunk))
        self.chunk_arrived()

    async def _write(self, chunks: list[bytes]) -> None:
        if not chunks:
            return
        try:
            await self.in_executor(write_all, self.writer.write, chunks)
        except WorkspaceError as exc:  # a full disk: the temporary file goes at once
            self.failure = exc
            self._abort_writer()

    async def get(self, path: str) -> None:
        rel = self.path_argument()
        workspace = self.services.workspaces.loaded(self.require_identity().user_id)
        cached = workspace.read_cached(rel, SMALL_FILE_BYTES) if workspace is not None else None
        if cached is not None:  # no trip to a worker thread: that trip was most of the cost
            info, content = cached
            self.set_file_headers(info)
            self.finish(content)
            return
        info, file, chunk = await self.on_workspace(open_with_first_chunk, rel)
        with file:
            self.set_file_headers(info)
            while chunk:  # a small file is answered in one go, a large one streamed
                self.write(chunk)
                if len(chunk) < READ_CHUNK_BYTES:
                    break
                await self.flush()
                chunk = await self.in_executor(file.read, READ_CHUNK_BYTES)
        self.finish()

    def set_file_headers(self, info: FileInfo) -> None:
        self.set_header("Content-Type", info.media_type)
        self.set_header("Content-Security-Policy", FILE_CSP)
        if info.as_attachment:
            self.set_header("Content-Disposition", "attachment")
        self.set_header("Content-Length", str(info.size))

    async def put(self, path: str) -> None:
        self.body_done()
        if self.failure is not None:
            raise self.failure
        writer, self.writer = self.writer, None  # the whole body is here: a client leaving now cannot undo it
        if writer is None:
            return  # the client left in between
        await self.in_executor(land, writer, self.chunks_to_write(None))
        self.answer({"success": True})

    async def post(self, path: str) -> None:
        await self.on_workspace(Workspace.create, self.path_argument())
        self.answer({"success": True})

    async def delete(self, path: str) -> None:
        await self.on_workspace(Workspace.delete, self.path_argument())
        self.answer({"success": True})

    def on_finish(self) -> None:
        self._abort_writer()
        super().on_finish()

    def on_connection_close(self) -> None:
        self._abort_writer()
        super().on_connection_close()

    def _abort_writer(self) -> None:
        if self.writer is not None:
            writer, self.writer = self.writer, None
            self.services.file_executor.submit(writer.abort)

    def _handle_request_exception(self, e: BaseException) -> None:
        self._abort_writer()
        super()._handle_request_exception(e)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.clear_header("Content-Security-Policy")
        self.clear_header("Content-Length")
        super().write_error(status_code, **kwargs)


class DownloadHandler(WorkspaceHandler):
    """GET /download/<path>: a file as an attachment, a folder (or the root) as a zip."""

    async def get(self, path: str) -> None:
        name, file = await self.on_workspace(Workspace.download, path)
        with file:
            self.set_header("Content-Type", "application/zip" if name.endswith(".zip") else "application/octet-stream")
            self.set_header("Content-Disposition", content_disposition(name))
            self.set_header("Content-Security-Policy", "sandbox; default-src 'none'")
            while chunk := await self.in_executor(file.read, READ_CHUNK_BYTES):
                self.write(chunk)
                await self.flush()
        self.finish()


def content_disposition(name: str) -> str:
    ascii_name = "".join(ch if 32 <= ord(ch) < 127 and ch not in '"\\' else "_" for ch in name)
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{urllib.parse.quote(name)}"


def open_with_first_chunk(workspace: Workspace, rel: str) -> tuple[FileInfo, BinaryIO, bytes]:
    info = workspace.read(rel)
    file = info.open()
    try:
        return info, file, file.read(READ_CHUNK_BYTES)
    except BaseException:
        file.close()
        raise
