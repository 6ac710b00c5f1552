"""The file API: list, upload, move, and read/write/create/delete one path.

All path handling lives in the workspace layer; these handlers only parse requests, run the
workspace call in the file executor, and answer. Bodies that can be large (uploads, PUT)
are streamed: each chunk is written to a temporary file as it arrives, and Tornado reads
the next chunk only once that write is done.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, BinaryIO, TypeVar

import tornado.web
from tornado.ioloop import IOLoop

from ..containers.backend import BackendError, UserRef
from ..multipart import MultipartError, MultipartParser
from ..uploads import UploadBatch
from ..workspace import AtomicWriter, FileInfo, Workspace, WorkspaceError
from .base import BaseHandler, HTTPError

log = logging.getLogger("threecompute.files")
T = TypeVar("T")
MAX_UPLOAD_BYTES = 10 * 1024**3
READ_CHUNK_BYTES = 256 * 1024


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


class ListFilesHandler(WorkspaceHandler):
    async def get(self) -> None:
        self.answer({"files": await self.on_workspace(Workspace.list_files)})


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
class UploadHandler(WorkspaceHandler):
    """POST /upload (files at the root, by base name) and /upload-folder (relative paths)."""

    keep_folders = False
    batch: UploadBatch | None = None
    failure: Exception | None = None

    async def prepare(self) -> None:
        super().prepare()
        self.request.connection.set_max_body_size(MAX_UPLOAD_BYTES)
        workspace = await self.workspace()
        try:
            boundary = MultipartParser.boundary_from_content_type(self.request.headers.get("Content-Type", ""))
        except MultipartError as exc:
            raise HTTPError(400, f"expected multipart/form-data: {exc}") from None
        self.batch = UploadBatch(workspace, boundary, self.keep_folders)

    async def data_received(self, chunk: bytes) -> None:
        if self.failure is not None:
            return  # read and drop the rest, so the client gets the error instead of a reset
        try:
            await self.in_executor(self.batch.feed, chunk)
        except (MultipartError, WorkspaceError) as exc:
            self.failure = exc
            await self.in_executor(self.batch.abort)

    async def post(self) -> None:
        if self.failure is not None:
            raise self.failure
        try:
            count = await self.in_executor(self.batch.finish)
        except MultipartError as exc:
            await self.in_executor(self.batch.abort)
            raise HTTPError(400, f"malformed upload: {exc}") from None
        except WorkspaceError:
            await self.in_executor(self.batch.abort)
            raise
        await self.after_upload()
        self.answer({"success": True, "files": count})

    async def after_upload(self) -> None:
        pass

    def on_connection_close(self) -> None:
        if self.batch is not None and not self._finished:
            self.services.file_executor.submit(self.batch.abort)

    def _handle_request_exception(self, e: BaseException) -> None:
        if isinstance(e, MultipartError):
            e = HTTPError(400, f"malformed upload: {e}")
        super()._handle_request_exception(e)


class UploadFolderHandler(UploadHandler):
    keep_folders = True

    async def after_upload(self) -> None:
        folder = self.batch.field("move-into")
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
class FileHandler(WorkspaceHandler):
    """GET, PUT (streamed, atomic), POST (create) and DELETE on one workspace path."""

    writer: AtomicWriter | None = None
    failure: WorkspaceError | None = None

    async def prepare(self) -> None:
        super().prepare()
        if self.request.method == "PUT":
            self.request.connection.set_max_body_size(MAX_UPLOAD_BYTES)
            workspace = await self.workspace()
            self.writer = await self.in_executor(workspace.open_writer, self.path_argument())

    def path_argument(self) -> str:
        path = self.path_args[0] if self.path_args else ""
        if not path:
            raise HTTPError(400, "a file path is required")
        return path

    async def data_received(self, chunk: bytes) -> None:
        if self.writer is None:
            return  # after a failure: read and drop the rest, so the client gets the error
        try:
            await self.in_executor(self.writer.write, chunk)
        except WorkspaceError as exc:  # a full disk: the temporary file goes at once
            self.failure = exc
            self._abort_writer()

    async def get(self, path: str) -> None:
        info, file, chunk = await self.on_workspace(open_with_first_chunk, self.path_argument())
        with file:
            self.set_header("Content-Type", info.media_type)
            self.set_header("Content-Security-Policy", "sandbox; default-src 'none'")
            if info.as_attachment:
                self.set_header("Content-Disposition", "attachment")
            self.set_header("Content-Length", str(info.size))
            while chunk:  # a small file is answered in one go, a large one streamed
                self.write(chunk)
                if len(chunk) < READ_CHUNK_BYTES:
                    break
                await self.flush()
                chunk = await self.in_executor(file.read, READ_CHUNK_BYTES)
        self.finish()

    async def put(self, path: str) -> None:
        if self.failure is not None:
            raise self.failure
        await self.in_executor(self.writer.commit)
        self.writer = None
        self.answer({"success": True})

    async def post(self, path: str) -> None:
        await self.on_workspace(Workspace.create, self.path_argument())
        self.answer({"success": True})

    async def delete(self, path: str) -> None:
        await self.on_workspace(Workspace.delete, self.path_argument())
        self.answer({"success": True})

    def on_finish(self) -> None:
        self._abort_writer()

    def on_connection_close(self) -> None:
        self._abort_writer()

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


def open_with_first_chunk(workspace: Workspace, rel: str) -> tuple[FileInfo, BinaryIO, bytes]:
    info = workspace.read(rel)
    file = info.open()
    try:
        return info, file, file.read(READ_CHUNK_BYTES)
    except BaseException:
        file.close()
        raise
