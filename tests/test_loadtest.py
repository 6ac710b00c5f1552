"""The load test script, briefly: 2 users x 1 tab for 8 s against the local backend, and its
JSON report's shape; plus its refusals (a non-loopback target, unbounded sizes)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys

import pytest

from .conftest import ROOT, load_script

SCRIPT = ROOT / "scripts" / "loadtest.py"


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
@pytest.mark.timeout(120)
def test_a_short_run_measures_echo_and_writes_its_report(tmp_path):
    out = tmp_path / "report.json"
    args = ["--spawn", "local", "--users", "2", "--tabs", "1", "--duration", "8", "--ramp", "1",
            "--burst-every", "3", "--big-every", "4", "--big-lines", "3000", "--out", str(out), "--quiet"]
    result = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=80)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "keystroke echo" in result.stdout

    report = json.loads(out.read_text())
    for key in ("config", "machine", "server", "counts", "attach_ms", "echo_ms", "paste_echo_ms", "output",
                "files_ms", "errors", "resources", "timeline"):
        assert key in report, key
    assert report["attach_ms"]["n"] == 2
    # A tab pastes first after 0.9 s at the earliest and prints a large output after 1.2 s, so
    # its first action, 0.3 s after it attached, is a command: 3 keys at least ("pwd").
    assert report["echo_ms"]["n"] == report["counts"]["keystrokes"] >= 6
    echo = report["echo_ms"]
    assert 0 < echo["p50"] <= echo["p95"] <= echo["p99"] <= echo["max"]
    assert report["output"]["runs"] >= 1 and report["output"]["bytes"] > 0
    assert report["files_ms"]["GET /list-files"]["n"] >= 5
    assert report["errors"] == {}
    resources = report["resources"]
    assert resources["available"] and resources["samples"]
    assert resources["server_rss_mib"]["max"] > 0
    assert resources["children_count"]["max"] == 2  # one PTY child per open terminal
    if importlib.util.find_spec("matplotlib") is not None:
        assert out.with_suffix(".png").stat().st_size > 0


def test_it_refuses_a_target_off_this_machine():
    loadtest = load_script("loadtest")
    with pytest.raises(SystemExit, match="loopback"):
        loadtest.require_loopback("http://10.1.2.3:5555")
    loadtest.require_loopback("http://127.0.0.1:5555")
    loadtest.require_loopback("http://localhost:5555")


@pytest.mark.parametrize("flags", [["--users", "1000"], ["--tabs", "50"], ["--users", "100", "--tabs", "10"],
                                   ["--duration", "99999"]])
def test_its_size_and_time_are_bounded(flags):
    loadtest = load_script("loadtest")
    with pytest.raises(SystemExit) as exit_info:
        loadtest.parse_args(flags)
    assert exit_info.value.code == 2
