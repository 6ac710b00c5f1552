"""Per-user shares of what every user needs: upload slots and file-executor threads.

One student must not be able to take everything: an upload holds a temporary file and a
connection until it ends, and a file operation (a DELETE of a 30,000-file tree, the walk of a
huge workspace) holds an executor thread. Each user gets at most a few of each; the rest wait
(threads) or are refused (uploads), so other users' requests keep their share.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

MAX_UPLOADS_PER_USER = 8  # uploads and PUTs in flight at once; the next is answered 429
FILE_THREADS_PER_USER = 2  # of the file executor's 8 threads


class UserLimits:
    def __init__(self, uploads: int = MAX_UPLOADS_PER_USER, threads: int = FILE_THREADS_PER_USER) -> None:
        self.max_uploads = uploads
        self.max_threads = threads
        self._uploads: dict[str, int] = {}
        self._threads: dict[str, tuple[asyncio.Semaphore, list[int]]] = {}

    def take_upload(self, user_id: str) -> bool:
        """Count one more upload in flight, unless the user is at the limit (then False)."""
        held = self._uploads.get(user_id, 0)
        if held >= self.max_uploads:
            return False
        self._uploads[user_id] = held + 1
        return True

    def release_upload(self, user_id: str) -> None:
        held = self._uploads.get(user_id, 0) - 1
        if held > 0:
            self._uploads[user_id] = held
        else:
            self._uploads.pop(user_id, None)

    def uploads_in_flight(self, user_id: str) -> int:
        return self._uploads.get(user_id, 0)

    @asynccontextmanager
    async def file_thread(self, user_id: str) -> AsyncIterator[None]:
        """Hold one of the user's executor shares for the body of the `async with`."""
        entry = self._threads.get(user_id)
        if entry is None:
            entry = self._threads[user_id] = (asyncio.Semaphore(self.max_threads), [0])
        semaphore, users = entry
        users[0] += 1
        try:
            async with semaphore:
                yield
        finally:
            users[0] -= 1
            if users[0] == 0:  # nobody holds or waits: forget the user
                del self._threads[user_id]
