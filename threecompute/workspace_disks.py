"""Workspaces as filesystems of their own, so that the quota holds for every writer.

The file API checks WORKSPACE_QUOTA_MB before each write, but a terminal writes past the
server, through the container's bind mount, and Docker cannot size a bind mount. With
WORKSPACE_DISKS=loop each workspace is an ext4 filesystem in a file of its own,
`DATA_DIR/disks/<user id>.ext4`, made and mounted the first time the server touches that
workspace, which is before its container starts: `yes > f` in a terminal stops at the quota
with "No space left on device" and takes no one else's space.

Layout: the filesystem is mounted on `DATA_DIR/disks/<user id>/`; its `ws/` holds the user's
files and is bind-mounted on `DATA_DIR/workspaces/<user id>/` (what the container mounts at
`/app`); its `tmp/` holds the server's temporary files, so an upload in progress counts
toward the quota and is renamed into place on the same mount (the server works through
`disks/<user id>/`: a rename between two mounts of one filesystem is refused by the kernel).

The image is allocated in full, never sparse: a sparse image on a full DATA_DIR would fail
writes inside a filesystem that believes it has room, which ext4 takes as an I/O error. It is
sized so that the space free in the new filesystem is at least the quota (ext4's journal and
tables take a few percent on top). A workspace that already holds files is copied into its
new filesystem once, and the copies replace the originals. Needs root, loop devices,
`mkfs.ext4` and `mount` (util-linux, e2fsprogs); blocking calls, run in an executor.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MOUNT_OPTIONS = "loop,nosuid,nodev,noatime"
TOOLS = ("mkfs.ext4", "mount", "umount", "cp")
SIZING_ROUNDS = 4  # each round adds what the last one's filesystem kept for itself
COMMAND_SECONDS = 120


class DiskError(RuntimeError):
    """A workspace filesystem could not be made or mounted."""


def missing_tools() -> list[str]:
    """The commands WORKSPACE_DISKS=loop needs that this host lacks."""
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def _run(*argv: str) -> None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_SECONDS, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DiskError(f"{argv[0]}: {exc}") from exc
    if done.returncode != 0:
        raise DiskError(f"{argv[0]} failed: {(done.stderr or done.stdout).strip()[-300:]}")


def _free_bytes(folder: Path) -> int:
    status = os.statvfs(folder)
    return status.f_bavail * status.f_frsize


def _clear(folder: Path) -> None:
    """Remove everything inside `folder` (links are removed, never followed)."""
    for entry in os.scandir(folder):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)


@dataclass(frozen=True)
class Disk:
    """Where the server works on one workspace held on a filesystem of its own."""

    files: Path  # the filesystem's ws/: the same files as DATA_DIR/workspaces/<user id>/
    temp: Path  # the server's temporary files, on the same mount as `files`


class WorkspaceDisks:
    """Makes, mounts and removes the workspaces' filesystems, each with `size_bytes` free."""

    def __init__(self, disks_dir: Path, size_bytes: int, owner: tuple[int, int] | None) -> None:
        self.disks_dir = disks_dir
        self.size_bytes = size_bytes
        self.owner = owner or (os.geteuid(), os.getegid())  # of ws/, as the workspace's own folder

    def image_of(self, root: Path) -> Path:
        return self.disks_dir / f"{root.name}.ext4"

    def ensure(self, root: Path) -> Disk:
        """Mount the filesystem of workspace `root` (made first, with the files already in
        `root` moved into it, if it has none) and bind its ws/ on `root`. Idempotent."""
        mounted = self.disks_dir / root.name
        disk = Disk(files=mounted / "ws", temp=mounted / "tmp")
        if not os.path.ismount(mounted):
            image = self.image_of(root)
            if not image.exists():
                self._make(image, root)
            mounted.mkdir(exist_ok=True)
            _run("mount", "-o", MOUNT_OPTIONS, str(image), str(mounted))
        if not os.path.ismount(root):
            _run("mount", "--bind", str(disk.files), str(root))
        return disk

    def remove(self, root: Path) -> None:
        """Unmount workspace `root` and delete its filesystem (the user is being deleted)."""
        mounted = self.disks_dir / root.name
        for point in (root, mounted):
            if os.path.ismount(point):
                _run("umount", "--lazy", str(point))  # a process still inside lets go later
        self.image_of(root).unlink(missing_ok=True)
        with suppress(FileNotFoundError):
            mounted.rmdir()

    def _make(self, image: Path, root: Path) -> None:
        # Made under another name and renamed when complete: an image present is a whole one.
        self.disks_dir.mkdir(parents=True, exist_ok=True)
        staging, mount_dir = image.with_name(image.name + ".new"), image.with_name(image.name + ".mnt")
        mount_dir.mkdir(exist_ok=True)
        try:
            self._format_and_mount(staging, mount_dir)
            try:
                self._lay_out(mount_dir, root)
            finally:
                _run("umount", str(mount_dir))
            os.replace(staging, image)
        except (OSError, DiskError) as exc:
            raise DiskError(f"cannot make the filesystem of workspace {root.name}: {exc}") from exc
        finally:
            staging.unlink(missing_ok=True)
            with suppress(OSError):
                mount_dir.rmdir()
        _clear(root)  # what it held is in the image now, and the bind mount would hide it

    def _format_and_mount(self, staging: Path, mount_dir: Path) -> None:
        size = self.size_bytes
        for round_ in range(SIZING_ROUNDS):
            with open(staging, "wb") as handle:
                os.posix_fallocate(handle.fileno(), 0, size)
            _run("mkfs.ext4", "-q", "-F", "-m", "0", str(staging))
            _run("mount", "-o", MOUNT_OPTIONS, str(staging), str(mount_dir))
            short = self.size_bytes - _free_bytes(mount_dir)
            if short <= 0 or round_ == SIZING_ROUNDS - 1:
                return
            _run("umount", str(mount_dir))
            size += short

    def _lay_out(self, mount_dir: Path, root: Path) -> None:
        (mount_dir / "lost+found").rmdir()  # fsck makes it again if ever needed
        (mount_dir / "tmp").mkdir(mode=0o700)
        files = mount_dir / "ws"
        files.mkdir()
        os.chown(files, *self.owner)
        files.chmod(root.stat().st_mode & 0o7777)
        if any(root.iterdir()):
            _run("cp", "-a", "--", f"{root}/.", str(files))
