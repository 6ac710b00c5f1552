"""WORKSPACE_DISKS=loop: each workspace an ext4 filesystem of WORKSPACE_QUOTA_MB, so a
terminal's writes stop at the quota too. Real loop mounts (root), a real server, real tmux
and containers; every mount made is undone at the end."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from threecompute.handlers.auth import dev_user_id
from threecompute.settings import ConfigError, load_settings
from threecompute.workspace_disks import DiskError, WorkspaceDisks, missing_tools

from .classroom_helpers import ok, signed_in
from .conftest import ADMIN, body_json
from .terminal_client import TerminalClient

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or bool(missing_tools()),
                                reason="loop mounts need root, mkfs.ext4 and mount")
MB = 2**20
QUOTA_MB = 8
BACKENDS = ["local", pytest.param("docker", marks=pytest.mark.docker)]


def mounts_under(folder: Path) -> list[Path]:
    with open("/proc/self/mounts", encoding="utf-8") as table:
        points = [Path(line.split()[1].replace("\\040", " ")) for line in table]
    return [p for p in points if p.is_relative_to(folder)]


def unmount_all(folder: Path) -> None:
    for point in sorted(mounts_under(folder), key=lambda p: len(p.parts), reverse=True):
        subprocess.run(["umount", "--lazy", str(point)], check=False)


@pytest.fixture
def data_dir(tmp_path) -> Iterator[Path]:
    folder = tmp_path / "data"
    try:
        yield folder
    finally:
        unmount_all(tmp_path)


@pytest.fixture(params=BACKENDS)
def server_flags(request) -> list[str]:
    return ["--dev", "--backend", request.param, "--host", "127.0.0.1"]


@pytest.fixture
def server_env(server_env) -> dict[str, str]:
    return server_env | {"WORKSPACE_QUOTA_MB": str(QUOTA_MB), "WORKSPACE_DISKS": "loop"}


@pytest.mark.gen_test(timeout=120)
async def test_a_terminal_cannot_write_past_the_quota(make_client, data_dir):
    student = await signed_in(make_client, "disk@example.com")
    assert (await student.fetch("/file/kept.txt", "PUT", b"written before the terminal")).code in (200, 201)
    workspace = data_dir / "workspaces" / dev_user_id("disk@example.com")
    assert os.path.ismount(workspace)
    assert (data_dir / "disks" / f"{workspace.name}.ext4").stat().st_size >= QUOTA_MB * MB

    term = await TerminalClient.open(student)
    await term.run("cat kept.txt; echo; ls -A | tr '\\n' ' '; echo listed-$((1+1))", "listed-2")
    assert "written before the terminal" in term.screen
    assert "lost+found" not in term.screen
    await term.run(f"head -c {3 * QUOTA_MB}M /dev/zero > big; echo wrote-$?", "wrote-1", timeout=60)
    assert "No space left on device" in term.screen
    size = (workspace / "big").stat().st_size
    assert 0.9 * QUOTA_MB * MB <= size <= 1.1 * QUOTA_MB * MB, size

    refused = await student.fetch("/file/more.txt", "PUT", b"x" * 64 * 1024)
    assert refused.code == 413 and "quota" in body_json(refused)["error"]
    assert (await student.fetch("/file/more.txt")).code == 404
    await term.run("rm big; echo freed-$((2+2))", "freed-4")
    assert (await student.fetch("/file/more.txt", "PUT", b"x" * 64 * 1024)).code in (200, 201)
    term.close()


@pytest.mark.gen_test(timeout=60)
async def test_deleting_the_user_unmounts_and_removes_the_filesystem(make_client, data_dir):
    student = await signed_in(make_client, "gone@example.com")
    assert (await student.fetch("/file/a.txt", "PUT", b"a")).code in (200, 201)
    user_id = dev_user_id("gone@example.com")
    workspace = data_dir / "workspaces" / user_id
    assert os.path.ismount(workspace)
    admin = await signed_in(make_client, ADMIN)
    await ok(admin, f"/admin/users/{user_id}", "DELETE")
    assert not os.path.ismount(workspace) and not workspace.exists()
    assert not (data_dir / "disks" / f"{user_id}.ext4").exists()


def test_an_existing_workspace_moves_into_its_filesystem(tmp_path):
    root = tmp_path / "workspaces" / "u1"
    (root / "src").mkdir(parents=True)
    (root / "src" / "main.py").write_text("print('kept')\n")
    os.symlink("src/main.py", root / "link")
    disks = WorkspaceDisks(tmp_path / "disks", QUOTA_MB * MB, None)
    try:
        disks.ensure(root)
        disks.ensure(root)  # mounted already: nothing more
        assert os.path.ismount(root) and len(mounts_under(root)) == 1
        assert (root / "src" / "main.py").read_text() == "print('kept')\n"
        assert os.readlink(root / "link") == "src/main.py"
        assert sorted(os.listdir(root)) == ["link", "src"]
        unmount_all(tmp_path)
        assert os.listdir(root) == []  # the originals were replaced by the copies, not kept twice
        disk = disks.ensure(root)  # after a reboot: the same filesystem, mounted again
        assert (root / "src" / "main.py").read_text() == "print('kept')\n"
        assert (disk.files / "src" / "main.py").read_text() == "print('kept')\n"
        assert os.stat(disk.temp).st_dev == os.stat(disk.files).st_dev  # renames from temp stay on it
        assert sorted(p.name for p in (tmp_path / "disks").iterdir()) == ["u1", "u1.ext4"]
    finally:
        unmount_all(tmp_path)


def test_a_workspace_larger_than_the_quota_is_left_as_it_was(tmp_path):
    root = tmp_path / "workspaces" / "u2"
    root.mkdir(parents=True)
    (root / "big.bin").write_bytes(os.urandom(3 * MB))
    disks = WorkspaceDisks(tmp_path / "disks", 1 * MB, None)
    try:
        with pytest.raises(DiskError, match="cannot make the filesystem of workspace u2"):
            disks.ensure(root)
        assert not os.path.ismount(root) and (root / "big.bin").stat().st_size == 3 * MB
        assert list((tmp_path / "disks").iterdir()) == []  # no image, no staging file left
    finally:
        unmount_all(tmp_path)


@pytest.mark.parametrize(("flags", "env", "message"), [
    (["--dev"], {"WORKSPACE_DISKS": "loop"}, "WORKSPACE_DISKS=loop needs WORKSPACE_QUOTA_MB"),
    (["--dev", "--backend", "swarm"], {"WORKSPACE_DISKS": "loop", "WORKSPACE_QUOTA_MB": "10"},
     "WORKSPACE_DISKS=loop cannot serve --backend swarm"),
    (["--dev"], {"WORKSPACE_DISKS": "zfs"}, "WORKSPACE_DISKS must be"),
])
def test_settings_that_cannot_work_are_refused_at_start(tmp_path, flags, env, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(flags, env, dotenv=tmp_path / "no.env")
