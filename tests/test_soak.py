"""The soak script, short: about 60 s of a few users against the Docker backend with one
fault of each kind, and its books (nothing lost, nothing leaked, the bystander's echo, with
and without the server).

The `dockerd` fault stops the engine, and with it every container on it, so it only runs
where the engine is this test run's alone: SOAK_STOP_DOCKERD=1 (CI sets it)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from .conftest import ROOT, load_script

SCRIPT = ROOT / "scripts" / "soak.py"
CALLERS_OWN = "SOAK_CALLERS_OWN_SETTING"
FAULTS = "exec,container,disk,restart" + (",dockerd" if os.environ.get("SOAK_STOP_DOCKERD") == "1" else "")


@pytest.mark.docker
@pytest.mark.skipif(os.geteuid() != 0, reason="the soak mounts a tmpfs DATA_DIR: root")
@pytest.mark.timeout(400)
def test_a_short_soak_with_every_fault_loses_and_leaks_nothing(tmp_path):
    out = tmp_path / "soak.json"
    args = ["--spawn", "docker", "--users", "6", "--tabs", "2", "--duration", "60", "--warmup", "8",
            "--ramp", "5", "--session-seconds", "15", "40", "--faults", FAULTS, "--disk-mb", "128",
            "--disk-hold", "6", "--big-every", "20", "--big-lines", "5000", "--out", str(out),
            # The baseline as soon as the warm-up has gone, not once the server has let go of its
            # users' records: a minute less, for a memory bound that is only looser.
            "--settle", "5",
            # A shared CI machine's scheduling tail is not the server's: the 50 ms target is the
            # long soak's (make soak); here a bound that only a stalled server misses.
            "--echo-limit-ms", "250"]
    result = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=380, env={**os.environ, CALLERS_OWN: "1"})
    assert out.exists(), result.stderr[-3000:]
    report = json.loads(out.read_text())
    summary = {k: report[k] for k in ("checks", "leaks", "memory", "faults", "errors_outside_faults",
                                      "bystander_echo_ms")}
    summary["slowest_echoes"] = sorted(report["bystander_samples"], key=lambda s: -s[1])[:12]
    assert result.returncode == 0 and report["passed"], (summary, result.stderr[-2000:])
    assert sorted(f["kind"] for f in report["faults"]) == sorted(FAULTS.split(","))
    assert report["files"]["acknowledged"] > 20 and report["files"]["lost"] == []
    assert report["files"].get("refused_507", 0) >= 1  # the disk fault really refused writes
    assert report["counts"]["keystrokes"] > 100 and report["counts"]["sessions"] > 6
    assert report["bystander_echo_ms"]["outside_faults"]["n"] >= 20
    assert report["bystander_raw_echo_ms"]["outside_faults"]["n"] >= 20  # the same keys, without the server
    assert report["cpu"]["server_cores"]["mean"] > 0 and report["cpu"]["machine_busy_percent"]["mean"] > 0
    if importlib.util.find_spec("matplotlib") is not None:  # requirements-bench.txt
        assert out.with_suffix(".png").stat().st_size > 0
    if "dockerd" in FAULTS:  # the engine it started again has none of the soak's environment
        engines = load_script("soak").default_engine()
        assert engines and all(CALLERS_OWN not in engine.environ() for engine in engines), engines


@pytest.mark.parametrize("flags", [["--memory-wait", "-1"], ["--memory-wait", "601"], ["--settle", "-1"],
                                   ["--disk-hold", "0"], ["--users", "201"], ["--duration", "5"]])
def test_its_settings_are_bounded(flags, capsys):
    soak = load_script("soak")
    with pytest.raises(SystemExit) as exit_info:
        soak.parse_args(flags)
    assert exit_info.value.code == 2
    assert flags[0] in capsys.readouterr().err
    assert soak.parse_args(["--memory-wait", "0"]).memory_wait == 0
