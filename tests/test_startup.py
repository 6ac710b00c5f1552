"""Start-up: flags and settings, and the one-line errors for bad ones."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from bench.common import port_is_free
from threecompute.settings import ConfigError, load_settings

from .conftest import ROOT, run_server_process

LONG_SECRET = "s" * 32


def settings_from(argv: list[str], env: dict[str, str], tmp_path: Path):
    return load_settings(argv, env, dotenv=tmp_path / "none.env")


def test_defaults(tmp_path):
    settings = settings_from([], {"FLASK_SECRET": LONG_SECRET}, tmp_path)
    assert (settings.host, settings.port, settings.backend) == ("127.0.0.1", 5555, "docker")
    assert settings.port_base == 8000
    assert settings.container_image == "3compute"
    assert settings.data_dir == Path("data").absolute()
    assert settings.deploy_command == "/opt/deploy.sh"
    assert settings.spare_attach_seconds == 60.0
    assert settings.server_nice == -10


def test_spare_attachments_can_be_turned_off_but_not_made_negative(tmp_path):
    env = {"FLASK_SECRET": LONG_SECRET}
    assert settings_from([], env | {"SPARE_ATTACH_SECONDS": "0"}, tmp_path).spare_attach_seconds == 0.0
    with pytest.raises(ConfigError, match="SPARE_ATTACH_SECONDS"):
        settings_from([], env | {"SPARE_ATTACH_SECONDS": "-5"}, tmp_path)


def test_host_ip_is_the_default_host(tmp_path):
    env = {"FLASK_SECRET": LONG_SECRET, "HOST_IP": "0.0.0.0"}
    assert settings_from([], env, tmp_path).host == "0.0.0.0"
    assert settings_from(["--host", "127.0.0.2"], env, tmp_path).host == "127.0.0.2"


def test_dotenv_is_read_and_the_environment_wins(tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text(f'# comment\nFLASK_SECRET="{LONG_SECRET}"\nexport PORT_BASE=9000\nCONTAINER_IMAGE=img\n')
    settings = load_settings([], {"CONTAINER_IMAGE": "from-env"}, dotenv=dotenv)
    assert (settings.secret, settings.port_base, settings.container_image) == (LONG_SECRET, 9000, "from-env")


def test_production_picks_the_prod_origin(tmp_path):
    env = {"FLASK_SECRET": LONG_SECRET, "FLASK_ENV": "production", "FRONTEND_ORIGIN_PROD": "https://app.example/",
           "FRONTEND_ORIGIN_DEV": "http://localhost:3000", "REDIRECT_URI_PROD": "https://api.example/callback"}
    settings = settings_from([], env, tmp_path)
    assert settings.production and settings.frontend_origin == "https://app.example"
    assert settings.redirect_uri == "https://api.example/callback"


@pytest.mark.parametrize("argv, env, names", [
    (["--port", "abc"], {"FLASK_SECRET": LONG_SECRET}, "--port"),
    (["--port", "70000"], {"FLASK_SECRET": LONG_SECRET}, "--port"),
    ([], {}, "FLASK_SECRET"),
    ([], {"FLASK_ENV": "production"}, "FLASK_SECRET"),
    (["--dev"], {"FLASK_ENV": "production", "FLASK_SECRET": LONG_SECRET}, "--dev"),
    ([], {"FLASK_SECRET": LONG_SECRET, "PORT_BASE": "eight"}, "PORT_BASE"),
    ([], {"FLASK_SECRET": LONG_SECRET, "MAX_CONTAINERS": "-1"}, "MAX_CONTAINERS"),
    ([], {"FLASK_SECRET": LONG_SECRET, "CONTAINER_PIDS": "-5"}, "CONTAINER_PIDS"),
    ([], {"FLASK_SECRET": LONG_SECRET, "CONTAINER_CPUS": "nan"}, "CONTAINER_CPUS"),
    ([], {"FLASK_SECRET": LONG_SECRET, "CONTAINER_MEMORY": "lots"}, "CONTAINER_MEMORY"),
    ([], {"FLASK_SECRET": LONG_SECRET, "IDLE_TIMEOUT_SECONDS": "-3"}, "IDLE_TIMEOUT_SECONDS"),
    ([], {"FLASK_SECRET": LONG_SECRET, "SERVER_NICE": "-21"}, "SERVER_NICE must be at least -20"),
    ([], {"FLASK_SECRET": LONG_SECRET, "SERVER_NICE": "20"}, "SERVER_NICE must be at most 19"),
    (["--backend", "local"], {"FLASK_SECRET": LONG_SECRET}, "--backend local"),
    ([], {"FLASK_SECRET": LONG_SECRET, "DATABASE_URL": "mysql://db/3compute"}, "DATABASE_URL"),
    (["--backend", "local", "--dev", "--host", "0.0.0.0"], {}, "--backend local"),
    ([], {"FLASK_SECRET": "a"}, "FLASK_SECRET must be at least 32 bytes"),
    ([], {"FLASK_SECRET": "s" * 31}, "FLASK_SECRET must be at least 32 bytes"),
    ([], {"FLASK_SECRET": LONG_SECRET, "PORT_BASE": "65527"}, "PORT_BASE"),
    ([], {"FLASK_SECRET": LONG_SECRET, "ALLOWED_HOSTS": "ok.example, *.example"}, "ALLOWED_HOSTS"),
    ([], {"FLASK_SECRET": LONG_SECRET, "TRUSTED_PROXIES": "10.0.0.0/8,proxy"}, "TRUSTED_PROXIES"),
])
def test_bad_settings_name_the_culprit(tmp_path, argv, env, names):
    with pytest.raises(ConfigError, match=names):
        settings_from(argv, env, tmp_path)


def test_a_short_secret_is_accepted_only_in_dev(tmp_path):
    assert settings_from(["--dev"], {"FLASK_SECRET": "a"}, tmp_path).secret == "a"
    assert settings_from([], {"FLASK_SECRET": "é" * 16}, tmp_path).secret  # 32 bytes, 16 characters


def test_the_highest_port_base_still_fits_one_user(tmp_path):
    assert settings_from([], {"FLASK_SECRET": LONG_SECRET, "PORT_BASE": "65526"}, tmp_path).port_base == 65526


def test_allowed_hosts_are_loopback_the_bind_address_the_urls_and_the_list(tmp_path):
    env = {"FLASK_SECRET": LONG_SECRET, "FRONTEND_ORIGIN_DEV": "http://app.example:3000",
           "REDIRECT_URI_DEV": "https://login.example/auth/callback", "ALLOWED_HOSTS": "Proxy.Example:443, [fd00::1]"}
    settings = settings_from(["--host", "10.1.2.3"], env, tmp_path)
    assert settings.allowed_hosts == {"127.0.0.1", "localhost", "::1", "10.1.2.3", "app.example",
                                      "login.example", "proxy.example", "fd00::1"}
    wildcard = settings_from(["--host", "0.0.0.0"], {**env, "ALLOWED_HOSTS": ""}, tmp_path)
    assert wildcard.allowed_hosts == {"127.0.0.1", "localhost", "::1", "app.example", "login.example"}


def test_cookies_are_secure_unless_dev_over_plain_http(tmp_path):
    assert settings_from([], {"FLASK_SECRET": LONG_SECRET}, tmp_path).secure_cookies
    assert not settings_from(["--dev"], {}, tmp_path).secure_cookies
    https = {"FRONTEND_ORIGIN_DEV": "https://app.example"}
    assert settings_from(["--dev"], https, tmp_path).secure_cookies


def test_dev_without_a_secret_makes_one(tmp_path):
    settings = settings_from(["--dev"], {}, tmp_path)
    assert settings.secret and settings.secret_generated


@pytest.mark.parametrize("args, env, names", [
    (["--port", "abc"], {"FLASK_SECRET": LONG_SECRET}, "--port"),
    ([], {"FLASK_ENV": "production", "FLASK_SECRET": ""}, "FLASK_SECRET"),
    (["--dev"], {"FLASK_ENV": "production", "FLASK_SECRET": LONG_SECRET}, "--dev"),
    ([], {"FLASK_SECRET": LONG_SECRET, "MAX_CONTAINERS": "many"}, "MAX_CONTAINERS"),
    ([], {"FLASK_SECRET": "a"}, "FLASK_SECRET"),
    ([], {"FLASK_SECRET": LONG_SECRET, "PORT_BASE": "65530"}, "PORT_BASE"),
    (["--dev", "--backend", "local"], {"FLASK_SECRET": LONG_SECRET, "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"},
     "cannot reach the database"),
])
def test_the_server_exits_with_one_line_not_a_traceback(tmp_path, args, env, names):
    result = run_server_process(args, {"DATA_DIR": str(tmp_path / "data"), **env}, cwd=tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert names in lines[0] and "Traceback" not in result.stderr


def wait_for_health(port: int, deadline: float) -> dict:
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as answer:
                return {"code": answer.status}
        except OSError:
            time.sleep(0.1)
    raise AssertionError("the server never answered /healthz")


def spawn_server(tmp_path: Path, env: dict[str, str], **streams: Any) -> tuple[subprocess.Popen, int]:
    """`server.py --dev --backend local` on a free port, its DATA_DIR in `tmp_path`."""
    port = next(p for p in range(41000, 43000) if port_is_free(p))
    process = subprocess.Popen([sys.executable, str(ROOT / "server.py"), "--dev", "--backend", "local",
                                "--port", str(port)], cwd=tmp_path, env=env | {"DATA_DIR": str(tmp_path / "data")},
                               **streams)
    return process, port


def test_the_server_reports_on_sigusr1_and_stops_cleanly_on_sigterm(tmp_path):
    process, port = spawn_server(tmp_path, {**os.environ, "PYTHONUNBUFFERED": "1"},
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_for_health(port, time.monotonic() + 20)["code"] == 200
        process.send_signal(signal.SIGUSR1)  # a resource report, and the server goes on
        time.sleep(0.5)
        assert wait_for_health(port, time.monotonic() + 5)["code"] == 200
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=20)
    finally:
        process.kill()
    assert process.returncode == 0, output
    assert "random one" in output  # --dev without FLASK_SECRET says so
    assert re.search(r"resources: 0 terminal\(s\), \d+ descriptor\(s\), \d+ thread\(s\)", output), output
    # What startup made is frozen out of the collector's reach: it outnumbers what it still scans.
    tracked, frozen = map(int, re.search(r"(\d+) tracked, (\d+) frozen at startup", output).groups())
    assert frozen > 10_000 and frozen > 3 * tracked, output
    assert "Traceback" not in output


@pytest.mark.parametrize("chosen, runs_on", [(None, "malloc"), ("pymalloc", "pymalloc")])
def test_the_server_runs_on_the_system_allocator_unless_one_is_chosen(tmp_path, chosen, runs_on):
    """Started again in place (same pid) with PYTHONMALLOC=malloc; an allocator the
    environment names is kept."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONMALLOC"}
    if chosen:
        env["PYTHONMALLOC"] = chosen
    process, port = spawn_server(tmp_path, env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for_health(port, time.monotonic() + 20)["code"] == 200
        environment = Path(f"/proc/{process.pid}/environ").read_bytes().split(b"\0")
        assert f"PYTHONMALLOC={runs_on}".encode() in environment
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        process.kill()
