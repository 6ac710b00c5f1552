"""The test runner of a grading container.

Each test runs in a child process whose output comes back through a pipe: the submitted code
never runs in this process, and this process makes itself non-dumpable so that a child (same
uid) cannot read its memory or descriptors. The child runs the one test with pytest (the
users' image has it); in an image without pytest it falls back to the standard library:
module-level `test_*` functions with plain `assert`, and `unittest.TestCase` classes. Tests
are found by reading the test files' syntax (`ast`), never by importing them here. The last
line it prints is the JSON result.

    runner.py <tests folder> <submission folder> <seconds per test>
"""

import ast
import contextlib
import ctypes
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
from pathlib import Path

MAX_TEST_OUTPUT = 4000
# A test passes only when its child writes the token it was given on stdin to the result
# pipe, after the test returned: exiting 0 some other way (atexit, os._exit, SystemExit) is a
# failure. The token is read before any submitted code is imported and kept in locals only.
CHILD = r"""
import importlib.util, os, sys, unittest


class Outcomes:
    # Passed means every phase reported and none failed or skipped: a submission that calls
    # pytest.skip() in the code under test does not pass.
    def __init__(self):
        self.seen = []

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.outcome != "passed":
            self.seen.append(report.outcome)


def with_pytest(pytest, tests, file, name):
    outcomes = Outcomes()
    node = tests + "/" + file + "::" + name.replace(".", "::")
    code = pytest.main(["-q", "--no-header", "-p", "no:cacheprovider", "-o", "addopts=",
                        "--rootdir", tests, node], plugins=[outcomes])
    return code == 0 and outcomes.seen and set(outcomes.seen) == {"passed"}


def with_unittest(tests, file, name):
    spec = importlib.util.spec_from_file_location(file[:-3], tests + "/" + file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if "." not in name:
        getattr(module, name)()
        return True
    cls, method = name.split(".", 1)
    result = unittest.TestResult()
    getattr(module, cls)(method).run(result)
    for _, text in result.failures + result.errors:
        print(text)
    return result.testsRun == 1 and not (result.failures or result.errors or result.skipped)


def main(token, out):
    tests, submission, file, name = sys.argv[1:5]
    sys.path[:0] = [submission, tests]
    os.environ["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # the image's pytest alone, as installed
    try:
        import pytest
    except ImportError:
        pytest = None
    passed = with_pytest(pytest, tests, file, name) if pytest else with_unittest(tests, file, name)
    if not passed:
        sys.exit(1)
    sys.stdout.flush()
    os.write(out, token)
    os._exit(0)


main(sys.stdin.buffer.readline().strip(), int(sys.argv[5]))
"""


def found_tests(folder: Path) -> list[tuple[str, str]]:
    found = []
    for path in sorted(p for p in folder.glob("*.py") if p.name != "conftest.py"):
        for node in ast.parse(path.read_text(encoding="utf-8", errors="replace")).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
                found.append((path.name, node.name))
            elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
                found += [(path.name, f"{node.name}.{f.name}") for f in node.body
                          if isinstance(f, ast.FunctionDef) and f.name.startswith("test")]
    return found


def kill_group(pid: int) -> None:
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)  # the test and whatever it started


def run_one(tests: Path, submission: Path, file: str, name: str, seconds: float) -> dict:
    label = f"{file}::{name}"
    token = secrets.token_hex(16).encode()
    read_end, write_end = os.pipe()
    try:
        child = subprocess.Popen(
            [sys.executable, "-B", "-c", CHILD, str(tests), str(submission), file, name, str(write_end)],
            cwd="/tmp", stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True, pass_fds=(write_end,))
    except OSError as exc:  # e.g. the pids limit reached by a fork bomb
        os.close(read_end)
        return {"name": label, "outcome": "error", "output": str(exc)}
    finally:
        os.close(write_end)
    with contextlib.suppress(OSError):
        child.stdin.write(token + b"\n")
        child.stdin.close()
    timer = threading.Timer(seconds, kill_group, (child.pid,))
    timer.start()
    output = bytearray()
    while chunk := child.stdout.read(65536):  # drained, but only the start is kept
        if len(output) < MAX_TEST_OUTPUT:
            output += chunk[: MAX_TEST_OUTPUT - len(output)]
    code = child.wait()
    kill_group(child.pid)  # what it left running (it would hold the pipes)
    timed_out = not timer.is_alive() and code < 0
    timer.cancel()
    os.set_blocking(read_end, False)
    try:
        reported = os.read(read_end, 64)
    except OSError:
        reported = b""
    os.close(read_end)
    outcome = "passed" if code == 0 and reported == token else "timeout" if timed_out else "failed"
    return {"name": label, "outcome": outcome, "output": output.decode(errors="replace")}


def main() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0
    tests, submission, seconds = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
    results = [run_one(tests, submission, f, n, seconds) for f, n in found_tests(tests)]
    os.write(1, b"\n" + json.dumps({"tests": results}).encode() + b"\n")


main()
