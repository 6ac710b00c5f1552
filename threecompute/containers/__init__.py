"""Where users' terminals run: the backend interface, its implementations and a factory.

`make_backend(settings)` picks the implementation named by `--backend`; the rest of the
server only ever sees the `ContainerBackend` interface from `backend.py`.
Everything a backend makes on shared ground (Docker containers, networks, firewall chains,
tmux sockets) is tagged with `deployment_id(settings.data_dir)`, so two servers with
different DATA_DIRs never touch each other's things.
"""

from __future__ import annotations

import hashlib
import posixpath
from pathlib import Path
from typing import TYPE_CHECKING

from threecompute.containers.backend import BackendError, ContainerBackend

if TYPE_CHECKING:
    from threecompute.settings import Settings


def deployment_id(data_dir: Path) -> str:
    """A short, stable hash of the absolute DATA_DIR: this deployment's name on the host."""
    return hashlib.sha256(str(Path(data_dir).absolute()).encode()).hexdigest()[:12]


def clean_folder(folder: str) -> str:
    """A workspace-relative folder as a clean POSIX path ("" for the workspace root).

    `..` cannot climb above the root (the path is normalised as if absolute). Raises
    BackendError for control characters, which would turn into keystrokes when typed into
    a shell, and for backslashes.
    """
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in folder) or "\\" in folder:
        raise BackendError(f"bad folder name: {folder!r}")
    return posixpath.normpath("/" + folder).lstrip("/")


def make_backend(settings: Settings) -> ContainerBackend:
    """The backend chosen by `settings.backend` ("docker", "swarm" or "local")."""
    if settings.backend == "local":
        from threecompute.containers.local import LocalBackend

        return LocalBackend(settings)
    if settings.backend == "docker":
        from threecompute.containers.docker import DockerBackend

        return DockerBackend(settings)
    if settings.backend == "swarm":
        from threecompute.containers.swarm import SwarmBackend

        return SwarmBackend(settings)
    raise ValueError(f"unknown backend: {settings.backend!r}")


__all__ = ["BackendError", "ContainerBackend", "clean_folder", "deployment_id", "make_backend"]
