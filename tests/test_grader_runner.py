"""The grading runner on its own, as a process on this host: pytest where it is installed, the
standard library where it is not (a custom image), the same outcomes from both. The run in a
real grading container is in test_grading.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

RUNNER = Path(__file__).resolve().parent.parent / "threecompute" / "grader" / "runner.py"
TESTS = {
    "test_add.py": "import unittest\nfrom solution import add\n\n"
                   "def test_add():\n    assert add(2, 3) == 5\n\n"
                   "class TestMore(unittest.TestCase):\n"
                   "    def test_neg(self):\n        self.assertEqual(add(-1, 1), 0)\n",
    "conftest.py": "def test_not_a_test():\n    pass\n",
}


def graded(tmp_path: Path, solution: str, without_pytest: bool) -> dict[str, str]:
    tests, submission = tmp_path / "tests", tmp_path / "submission"
    for folder, files in ((tests, TESTS), (submission, {"solution.py": solution})):
        folder.mkdir(exist_ok=True)
        for name, text in files.items():
            (folder / name).write_text(text)
    env = dict(os.environ)
    if without_pytest:  # an import of pytest fails, as in an image without it
        (tmp_path / "stub").mkdir(exist_ok=True)
        (tmp_path / "stub" / "pytest.py").write_text("raise ImportError('no pytest here')\n")
        env["PYTHONPATH"] = str(tmp_path / "stub")
    done = subprocess.run([sys.executable, str(RUNNER), str(tests), str(submission), "10"],
                          capture_output=True, env=env, timeout=60, check=True)
    result = json.loads(done.stdout.splitlines()[-1])
    outcomes = {t["name"]: t["outcome"] for t in result["tests"]}
    return outcomes | {"output": "".join(t["output"] for t in result["tests"])}


@pytest.mark.parametrize("without_pytest", [False, True], ids=["pytest", "stdlib"])
def test_both_runners_agree_on_the_outcomes(tmp_path, without_pytest):
    right = graded(tmp_path, "def add(a, b):\n    return a + b\n", without_pytest)
    assert right == {"test_add.py::test_add": "passed", "test_add.py::TestMore.test_neg": "passed",
                     "output": right["output"]}
    wrong = graded(tmp_path, "def add(a, b):\n    return a - b\n", without_pytest)
    assert (wrong["test_add.py::test_add"], wrong["test_add.py::TestMore.test_neg"]) == ("failed", "failed")
    # pytest reports the values compared; the standard library, the traceback's assertion.
    assert ("assert -1 == 5" in wrong["output"]) is not without_pytest
    assert "AssertionError" in wrong["output"]
