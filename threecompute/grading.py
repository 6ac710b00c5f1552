"""Running an assignment's hidden tests against one student's work, in a throwaway container.

Never in the server's process, never in the student's own container (where their processes
could read or change the tests). Each run:

1. snapshots the student's assignment folder through the workspace layer (its zip download,
   which follows no link out of the workspace) into a fresh folder of the server's, so that a
   link swapped in cannot make Docker mount another student's folder, and the student's
   running programs cannot change the files under test;
2. starts a container from CONTAINER_IMAGE as the users' uid with the snapshot at
   /submission and the hidden tests at /grader (both read-only), the runner at /runner
   (read-only), no network at all, every capability dropped, no-new-privileges, a read-only
   root with a small /tmp, memory, pids and CPU limits, a log capped at 1 MB;
3. waits at most GRADING_TIMEOUT_SECONDS, then kills it; removes it in every case.

`grader/runner.py` runs each hidden test with pytest (in the users' image) in a child process
of its own, and falls back to the standard library in an image without pytest. Runs are
bounded: at most GRADING_CONCURRENCY at once per server, the rest wait in line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import docker
import docker.errors
import requests

from .classrooms import Assignment, Classrooms
from .containers import deployment_id
from .containers.backend import BackendError
from .containers.docker import CONTAINER_USER, LABEL_DEPLOYMENT
from .settings import Settings
from .workspace import Workspace, WorkspaceError

log = logging.getLogger(__name__)
RUNNER = Path(__file__).parent / "grader"
MAX_OUTPUT = 20_000
MAX_SUBMISSION_BYTES = 50 * 1024 * 1024
LABEL_GRADING = "3compute.grading"


class Grader:
    def __init__(self, settings: Settings, classrooms: Classrooms) -> None:
        self.settings = settings
        self.classrooms = classrooms
        self.slots = asyncio.Semaphore(settings.grading_concurrency)
        self._pool = ThreadPoolExecutor(max(2, settings.grading_concurrency), thread_name_prefix="grading")
        self.scratch = settings.data_dir / "tmp" / "grading"
        self.running = 0
        self.peak = 0  # the most runs at once so far (GRADING_CONCURRENCY bounds it)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    async def run(self, assignment: Assignment, workspace: Workspace) -> dict:
        """The result of one run (status, passed, failed, score, tests, output)."""
        async with self.slots:
            self.running += 1
            self.peak = max(self.peak, self.running)
            try:
                return await asyncio.get_running_loop().run_in_executor(self._pool, self._run, assignment, workspace)
            finally:
                self.running -= 1

    def _run(self, assignment: Assignment, workspace: Workspace) -> dict:
        self.scratch.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="run-", dir=self.scratch))
        try:
            submission = folder / "submission"
            try:
                self._snapshot(workspace, assignment.folder, submission)
            except WorkspaceError as exc:  # e.g. the folder made a link out of the workspace
                return {"status": "error", "passed": 0, "failed": 0, "score": 0.0, "tests": [],
                        "output": f"the assignment folder cannot be read: {exc.message}"}
            return self._container(assignment, submission)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _snapshot(self, workspace: Workspace, rel: str, target: Path) -> None:
        target.mkdir(mode=0o755)
        try:
            _, archive = workspace.download(rel)
        except WorkspaceError as exc:
            if exc.status == 404:
                return  # nothing handed in: the tests run against an empty folder
            raise
        with archive, zipfile.ZipFile(archive) as zipped:
            if sum(i.file_size for i in zipped.infolist()) > MAX_SUBMISSION_BYTES:
                raise WorkspaceError(413, "the assignment folder is too large to test")
            for info in zipped.infolist():
                parts = [p for p in info.filename.split("/") if p not in ("", ".", "..")]
                if not parts or info.is_dir():
                    continue
                out = target.joinpath(*parts)
                out.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
                out.write_bytes(zipped.read(info))
                out.chmod(0o644)
        for sub in target.rglob("*"):
            if sub.is_dir():
                sub.chmod(0o755)

    def _container(self, assignment: Assignment, submission: Path) -> dict:
        s = self.settings
        tests = self.classrooms.assignment_dir(assignment) / "tests"
        container = client = None
        try:
            client = docker.from_env(version="auto", timeout=30)
            container = client.containers.create(
                s.container_image,
                ["python3", "-B", "/runner/runner.py", "/grader", "/submission", str(s.grading_test_seconds)],
                user=CONTAINER_USER, working_dir="/tmp", network_mode="none",
                environment={"HOME": "/tmp", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"},
                volumes={str(submission): {"bind": "/submission", "mode": "ro"},
                         str(tests.absolute()): {"bind": "/grader", "mode": "ro"},
                         str(RUNNER): {"bind": "/runner", "mode": "ro"}},
                labels={LABEL_DEPLOYMENT: deployment_id(s.data_dir), LABEL_GRADING: assignment.id},
                cap_drop=["ALL"], security_opt=["no-new-privileges"], read_only=True,
                tmpfs={"/tmp": "rw,nosuid,nodev,size=16m,mode=1777"}, ipc_mode="private",
                pids_limit=s.grading_pids, mem_limit=s.grading_memory, memswap_limit=s.grading_memory,
                nano_cpus=int(s.grading_cpus * 1e9),
                log_config=docker.types.LogConfig(type="json-file", config={"max-size": "1m", "max-file": "1"}),
            )
            container.start()
            try:
                exit_code = container.wait(timeout=s.grading_timeout_seconds)["StatusCode"]
                timed_out = False
            except (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError):
                with contextlib.suppress(docker.errors.APIError):
                    container.kill()
                exit_code, timed_out = -1, True
            logs = container.logs(stdout=True, stderr=True, tail=2000).decode(errors="replace")
            return _result(logs, exit_code, timed_out, s.grading_timeout_seconds)
        except docker.errors.ImageNotFound as exc:
            raise BackendError(f"the image {s.container_image} is missing") from exc
        except (docker.errors.APIError, requests.exceptions.RequestException, docker.errors.DockerException) as exc:
            raise BackendError(f"cannot run the tests: {exc}") from exc
        finally:
            if container is not None:
                with contextlib.suppress(docker.errors.APIError, requests.exceptions.RequestException):
                    container.remove(force=True)
            if client is not None:
                client.close()


def _result(logs: str, exit_code: int, timed_out: bool, limit: float) -> dict[str, Any]:
    """The runner's last line, or an error result when the run ended without one."""
    tests: list[dict] = []
    lines = logs.rstrip("\n").rsplit("\n", 1)
    try:
        tests = json.loads(lines[-1])["tests"]
        status = "done"
    except (ValueError, KeyError, TypeError, IndexError):
        status = "timeout" if timed_out else "error"
    output = "\n\n".join(f"{t['name']}: {t['outcome']}\n{t['output']}".rstrip() for t in tests) if tests else logs
    if status == "timeout":
        output = f"the run was stopped after {limit:g} s\n{output}"
    elif status == "error" and not tests:
        output = f"the test run ended without results (exit {exit_code})\n{output}"
    passed = sum(1 for t in tests if t.get("outcome") == "passed")
    return {"status": status, "passed": passed, "failed": len(tests) - passed,
            "score": round(100.0 * passed / len(tests), 1) if tests else 0.0,
            "tests": [{"name": str(t.get("name"))[:200], "outcome": str(t.get("outcome"))} for t in tests],
            "output": output[-MAX_OUTPUT:]}
