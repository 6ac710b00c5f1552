"""Attacks one student could make on the HTTP side to stop the server for everyone, each
performed against a real server on loopback and shown to fail, while a bystander's
`/list-files` stays fast (p95 under 100 ms, generous: it is a few ms when idle)."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from threecompute.app import server_options
from threecompute.handlers import files
from threecompute.handlers.auth import dev_user_id
from threecompute.limits import MAX_UPLOADS_PER_USER
from threecompute.uploads import UploadBatch
from threecompute.workspace import MAX_LISTED_ENTRIES, AtomicWriter

from .conftest import NO_RATE_LIMITS, Client, body_json
from .test_files import snapshot, upload

ATTACKER = "attacker@example.com"
BYSTANDER = "bystander@example.com"
P95_BOUND = 0.100
SHORT_TIMEOUT = 2.0



@pytest.fixture
def limits_env() -> dict[str, str]:
    """This module floods the server on purpose; the rate limits have tests of their own."""
    return NO_RATE_LIMITS

@pytest.fixture
def http_server_options() -> dict:
    # Short enough to watch in a test; the real values are in threecompute/app.py.
    return server_options() | {"idle_connection_timeout": SHORT_TIMEOUT, "body_timeout": SHORT_TIMEOUT}


def workspace_of(data_dir: Path, email: str) -> Path:
    return data_dir / "workspaces" / dev_user_id(email)


def temp_of(data_dir: Path, email: str) -> Path:
    return data_dir / "tmp" / dev_user_id(email)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def live_handlers() -> int:
    gc.collect()
    return sum(isinstance(o, files.UploadHandler | files.FileHandler) for o in gc.get_objects())


async def signed_in(make_client, email: str) -> Client:
    client = make_client()
    await client.dev_login(email)
    return client


class Bystander:
    """Polls /list-files as another user while the attack runs; `p95` of the answer times."""

    def __init__(self, client: Client, interval: float = 0.05) -> None:
        self.client, self.interval = client, interval
        self.times: list[float] = []
        self._task: asyncio.Task | None = None

    async def _poll(self) -> None:
        while True:
            started = time.perf_counter()
            answer = await self.client.fetch("/list-files")
            assert answer.code == 200, answer.body
            self.times.append(time.perf_counter() - started)
            await asyncio.sleep(self.interval)

    async def __aenter__(self) -> Bystander:
        await self.client.fetch("/list-files")  # the connection is made outside the measurement
        self._task = asyncio.ensure_future(self._poll())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self._task

    async def gathered(self, count: int) -> None:
        """Until `count` answers are in: the p95 of a handful of polls is their slowest one."""
        await wait_for(lambda: len(self.times) >= count, what=f"{count} bystander answers")

    def p95(self) -> float:
        ordered = sorted(self.times)
        return ordered[int(len(ordered) * 0.95)] if ordered else 0.0

    def check(self, what: str) -> None:
        assert len(self.times) >= 5, f"the bystander got only {len(self.times)} answers during {what}"
        print(f"\nbystander /list-files during {what}: {len(self.times)} polls, "
              f"p95 {self.p95() * 1000:.1f} ms, max {max(self.times) * 1000:.1f} ms")
        assert self.p95() < P95_BOUND, f"bystander p95 {self.p95() * 1000:.0f} ms during {what}"


async def raw(port: int, head: str, body: bytes = b"") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection that has sent `head` (request line and headers) and the first body bytes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head.encode() + b"\r\n" + body)
    await writer.drain()
    return reader, writer


def upload_head(path: str, client: Client, boundary: str, length: int) -> str:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: {client.cookie_header()}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {length}\r\n")


def file_parts(boundary: str, count: int, size: int = 10) -> bytes:
    return b"".join(
        (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="f{i}.txt"\r\n\r\n').encode()
        + b"x" * size + b"\r\n" for i in range(count))


async def wait_for(condition, timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def closed_by_server(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (fails if it does not)."""
    return await asyncio.wait_for(reader.read(), timeout)


# -- 1. descriptors ---------------------------------------------------------------------


@pytest.mark.gen_test(timeout=120)
async def test_an_upload_of_many_files_holds_one_descriptor(make_client, data_dir, http_port):
    attacker, bystander = await signed_in(make_client, ATTACKER), await signed_in(make_client, BYSTANDER)
    await attacker.fetch("/list-files")
    count, boundary = 500, uuid.uuid4().hex
    parts = file_parts(boundary, count)
    temp = temp_of(data_dir, ATTACKER)
    # Polled often: the upload is held only as long as the short body timeout allows.
    async with Bystander(bystander, interval=0.01) as watch:
        before = open_fds()
        # Every part but the closing boundary: the server holds all of them, waiting for the end.
        reader, writer = await raw(http_port, upload_head("/upload", attacker, boundary, len(parts) + 100), parts)
        await wait_for(lambda: len(os.listdir(temp)) == count, timeout=90, what=f"{count} temporary files")
        during = open_fds()
        await watch.gathered(40)
        writer.close()
        await wait_for(lambda: not os.listdir(temp), what="the temporary files to go")
    print(f"\n{count} files held by one upload: {during - before} more descriptors")
    assert during - before < 20, f"{during - before} descriptors for an upload of {count} files"
    assert os.listdir(workspace_of(data_dir, ATTACKER)) == []
    watch.check(f"an upload of {count} files")


@pytest.mark.gen_test(timeout=60)
async def test_uploads_in_flight_per_user_are_bounded(make_client, data_dir, http_port):
    attacker, other = await signed_in(make_client, ATTACKER), await signed_in(make_client, BYSTANDER)
    boundary = uuid.uuid4().hex
    held = [await raw(http_port, upload_head("/upload", attacker, boundary, 10_000), file_parts(boundary, 1))
            for _ in range(MAX_UPLOADS_PER_USER)]
    await wait_for(lambda: len(os.listdir(temp_of(data_dir, ATTACKER))) == MAX_UPLOADS_PER_USER,
                   what="the held uploads")
    refused = await upload(attacker, "/upload", [("one.txt", b"1")])
    assert refused.code == 429, refused.body
    assert "at most" in body_json(refused)["error"]
    put = await attacker.fetch("/file/put.txt", "PUT", b"x")
    assert put.code == 429, put.body
    assert (await upload(other, "/upload", [("theirs.txt", b"2")])).code == 200, "another user was refused"
    for _, writer in held:
        writer.close()
    await wait_for(lambda: not os.listdir(temp_of(data_dir, ATTACKER)), what="the dropped uploads' files")
    answer = await upload(attacker, "/upload", [("one.txt", b"1")])
    assert answer.code == 200, f"slots not given back: {answer.code} {answer.body}"


@pytest.mark.gen_test(timeout=60)
async def test_a_quiet_upload_sender_is_cut_off(make_client, data_dir, http_port, monkeypatch):
    monkeypatch.setattr(files, "UPLOAD_IDLE_SECONDS", 0.5)
    attacker = await signed_in(make_client, ATTACKER)
    boundary = uuid.uuid4().hex
    reader, writer = await raw(http_port, upload_head("/upload", attacker, boundary, 10**9), file_parts(boundary, 3))
    started = time.monotonic()
    await closed_by_server(reader, 10)
    print(f"\nquiet upload cut off after {time.monotonic() - started:.1f} s")
    writer.close()
    await wait_for(lambda: not os.listdir(temp_of(data_dir, ATTACKER)), what="the upload's files to go")
    assert os.listdir(workspace_of(data_dir, ATTACKER)) == []


@pytest.mark.gen_test(timeout=60)
async def test_slow_senders_are_cut_off_before_and_during_a_small_body(http_server, http_port):
    silent, _w1 = await raw(http_port, "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1")  # headers never end
    slow, _w2 = await raw(http_port, "POST /auth/tabs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n", b"{")
    started = time.monotonic()
    await closed_by_server(silent, SHORT_TIMEOUT + 5)
    await closed_by_server(slow, SHORT_TIMEOUT + 5)
    assert time.monotonic() - started < SHORT_TIMEOUT + 5


# -- 2. dropped streamed requests -------------------------------------------------------


@pytest.mark.gen_test(timeout=180)
async def test_dropped_puts_and_uploads_leave_nothing_behind(make_client, services, data_dir, http_port):
    attacker, bystander = await signed_in(make_client, ATTACKER), await signed_in(make_client, BYSTANDER)
    await attacker.fetch("/list-files")
    boundary = uuid.uuid4().hex
    put_head = (f"PUT /file/dropped.txt HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: {attacker.cookie_header()}\r\n"
                "Content-Length: 100000\r\n")
    baseline_fds, baseline_handlers = open_fds(), live_handlers()
    async with Bystander(bystander) as watch:
        for _ in range(63):  # 252 PUTs and 252 uploads, in rounds under the per-user upload limit
            opened = [await raw(http_port, put_head, b"half")
                      for _ in range(MAX_UPLOADS_PER_USER // 2)]
            opened += [await raw(http_port, upload_head("/upload", attacker, boundary, 100000),
                                 file_parts(boundary, 2))
                       for _ in range(MAX_UPLOADS_PER_USER // 2)]
            started = len(opened)
            await wait_for(lambda: services.limits.uploads_in_flight(dev_user_id(ATTACKER)) == started,  # noqa: B023
                           what="the requests to start")
            for _, writer in opened:
                writer.close()
            await wait_for(lambda: services.limits.uploads_in_flight(dev_user_id(ATTACKER)) == 0,
                           what="the dropped requests to end")
    await wait_for(lambda: not os.listdir(temp_of(data_dir, ATTACKER)), what="the temporary files to go")
    await wait_for(lambda: live_handlers() <= baseline_handlers, what="the handlers to end")
    assert open_fds() - baseline_fds < 10, f"{open_fds() - baseline_fds} descriptors more"
    assert os.listdir(workspace_of(data_dir, ATTACKER)) == []
    watch.check("504 dropped PUTs and uploads")


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize("kind, step", [("put", (AtomicWriter, "commit")), ("upload", (UploadBatch, "finish"))])
async def test_a_body_that_came_whole_lands_whole_when_its_client_leaves(kind, step, make_client, services, data_dir,
                                                                         http_port, monkeypatch, caplog):
    """The client leaves after sending the whole body, while the file is put in place: it lands
    whole, as any request whose answer is lost, with no error and nothing left behind."""
    client = await signed_in(make_client, ATTACKER)
    await client.fetch("/list-files")
    step_entered, client_left, resumed_after_leaving = threading.Event(), threading.Event(), []
    run_step = getattr(*step)

    def run_once_the_client_left(self, *args):
        step_entered.set()
        resumed_after_leaving.append(client_left.wait(20))
        return run_step(self, *args)

    monkeypatch.setattr(*step, run_once_the_client_left)
    content, boundary = b"whole " * 5000, uuid.uuid4().hex
    if kind == "put":
        body = content
        head = (f"PUT /file/landed.txt HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: {client.cookie_header()}\r\n"
                f"Content-Length: {len(body)}\r\n")
    else:
        body = (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="landed.txt"\r\n\r\n'
                .encode() + content + f"\r\n--{boundary}--\r\n".encode())
        head = upload_head("/upload", client, boundary, len(body))
    user_id, baseline_handlers = dev_user_id(ATTACKER), live_handlers()
    # The body apart from the head, read by the loop: the server then watches the socket for its close.
    _, writer = await raw(http_port, head)
    await wait_for(lambda: services.limits.uploads_in_flight(user_id) == 1, what="the request to start")
    writer.write(body)
    await wait_for(step_entered.is_set, what=f"{step[0].__name__}.{step[1]}")
    writer.close()
    await wait_for(lambda: services.limits.uploads_in_flight(user_id) == 0, what="the server to see the client leave")
    await asyncio.sleep(0.3)  # room for a clean-up to run, if one was started too soon
    client_left.set()
    await wait_for(lambda: live_handlers() <= baseline_handlers, what="the request to end")
    await wait_for(lambda: not os.listdir(temp_of(data_dir, ATTACKER)), what="the temporary file to go")
    assert resumed_after_leaving == [True]
    assert (workspace_of(data_dir, ATTACKER) / "landed.txt").read_bytes() == content
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], errors


# -- 3. form fields ---------------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_form_fields_are_capped_in_number_and_size(make_client, data_dir):
    attacker = await signed_in(make_client, ATTACKER)
    many = {f"f{i}": "x" for i in range(10_000)}
    answer = await upload(attacker, "/upload", [("a.txt", b"a")], many)
    assert answer.code == 413, answer.body
    big = {f"f{i}": "x" * 60_000 for i in range(5)}  # each under the per-field cap, too much in all
    answer = await upload(attacker, "/upload", [("a.txt", b"a")], big)
    assert answer.code == 413, answer.body
    assert os.listdir(workspace_of(data_dir, ATTACKER)) == []
    assert (await upload(attacker, "/upload", [("a.txt", b"a")], {"move-into": ""})).code == 200


# -- 4. bodies before authentication ----------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_a_large_unauthenticated_body_is_refused_unread(http_port, make_client):
    started = time.monotonic()
    reader, writer = await raw(http_port, "POST /auth/tabs HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                          "Content-Type: application/json\r\n"
                                          f"Content-Length: {1024 * 1024}\r\n", b"{" + b" " * 1023)
    answer = await closed_by_server(reader, 5)  # after 1 KiB of the 1 MiB
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), answer[:200]
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    assert "larger than" in json.loads(body[:length])["error"]
    assert time.monotonic() - started < 3
    # An upload's large limit comes only after authentication.
    reader, writer = await raw(http_port, "PUT /file/x HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1048576\r\n",
                               b"y" * 1024)
    answer = await closed_by_server(reader, 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    # Signed in, JSON routes still take small bodies only.
    client = await signed_in(make_client, ATTACKER)
    answer = await client.fetch("/auth/tabs", "POST", json.dumps({"tabs": ["1"] * 10_000}))
    assert answer.code == 413, answer.body


# -- 5. a big workspace -----------------------------------------------------------------


def fill(folder: Path, count: int, per_folder: int = 1000) -> None:
    for i in range(count):
        sub = folder / f"d{i // per_folder}"
        if i % per_folder == 0:
            sub.mkdir(parents=True)
        (sub / f"f{i}.txt").touch()


@pytest.mark.gen_test(timeout=180)
async def test_the_listing_of_a_huge_workspace_is_capped_and_cheap_for_others(make_client, data_dir, base_url):
    attacker, bystander = await signed_in(make_client, ATTACKER), await signed_in(make_client, BYSTANDER)
    (workspace_of(data_dir, BYSTANDER) / "mine.txt").write_text("x")
    normal = body_json(await bystander.fetch("/list-files"))
    assert normal == {"files": ["mine.txt"]}, "a normal workspace keeps the plain shape"
    fill(workspace_of(data_dir, ATTACKER), 30_000)
    listing = body_json(await attacker.fetch("/list-files"))
    assert listing["truncated"] is True and listing["limit"] == MAX_LISTED_ENTRIES
    assert len(listing["files"]) == MAX_LISTED_ENTRIES
    assert "d0/" in listing["files"] and "d29/" in listing["files"], "the shallowest entries come first"

    def poll(until: float) -> int:
        # In threads, like browsers elsewhere: the server's loop is what is measured, not a client's.
        with requests.Session() as session:
            session.headers["Cookie"] = attacker.cookie_header()
            polls = 0
            while time.monotonic() < until:
                assert session.get(f"{base_url}/list-files", timeout=30).status_code == 200
                polls += 1
                time.sleep(0.3)  # the frontend's rate
            return polls

    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(16) as pool:
        async with Bystander(bystander) as watch:
            until = time.monotonic() + 5
            polls = await asyncio.gather(*(loop.run_in_executor(pool, poll, until) for _ in range(16)))
    assert sum(polls) > 16 * 5
    watch.check("16 pollers of a 30,000-file workspace")


@pytest.mark.gen_test(timeout=300)
async def test_deletes_of_big_trees_do_not_hold_every_thread(make_client, data_dir):
    attacker, bystander = await signed_in(make_client, ATTACKER), await signed_in(make_client, BYSTANDER)
    root = workspace_of(data_dir, ATTACKER)
    for tree in range(8):
        fill(root / f"tree{tree}", 5000)
    async with Bystander(bystander) as watch:
        started = time.monotonic()
        answers = await asyncio.gather(*(attacker.fetch(f"/file/tree{t}", "DELETE") for t in range(8)))
        took = time.monotonic() - started
    assert [a.code for a in answers] == [200] * 8
    assert os.listdir(root) == []
    print(f"\n8 DELETEs of 5,000-file trees took {took:.1f} s")
    watch.check("8 DELETEs of 5,000-file trees")


# -- 13. a failed folder upload ---------------------------------------------------------


@pytest.mark.gen_test
async def test_a_failed_folder_upload_leaves_no_new_folders(make_client, data_dir):
    client = await signed_in(make_client, ATTACKER)
    root = workspace_of(data_dir, ATTACKER)
    (root / "kept").mkdir()
    (root / "kept" / "old.txt").write_text("old")
    before = snapshot(root)
    answer = await upload(client, "/upload-folder", [("new/deep/a.txt", b"a"), ("new/b.txt", b"b"),
                                                    ("kept/made/c.txt", b"c"), ("new/../../escape.txt", b"x")])
    assert answer.code == 400, answer.body
    assert snapshot(root) == before
    assert body_json(await client.fetch("/list-files")) == {"files": ["kept/", "kept/old.txt"]}
    assert os.listdir(temp_of(data_dir, ATTACKER)) == []


# -- 16. names like the server's temporary files ----------------------------------------


@pytest.mark.gen_test
async def test_files_named_like_temporary_files_are_listed(make_client, data_dir, http_port):
    client = await signed_in(make_client, ATTACKER)
    root = workspace_of(data_dir, ATTACKER)
    names = [".3compute-0123456789abcdef.tmp", "0123456789abcdef.tmp"]
    (root / names[0]).write_text("from the terminal")
    assert (await client.fetch(f"/file/{names[1]}", "PUT", b"from the API")).code == 200
    assert body_json(await client.fetch("/list-files")) == {"files": sorted(names)}
    # A PUT in progress puts nothing in the workspace; its bytes wait outside it.
    head = (f"PUT /file/new.txt HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: {client.cookie_header()}\r\n"
            "Content-Length: 1000\r\n")
    reader, writer = await raw(http_port, head, b"half")
    await wait_for(lambda: len(os.listdir(temp_of(data_dir, ATTACKER))) == 1, what="the PUT's temporary file")
    assert sorted(os.listdir(root)) == sorted(names)
    writer.close()
    await wait_for(lambda: not os.listdir(temp_of(data_dir, ATTACKER)), what="the PUT's temporary file to go")
