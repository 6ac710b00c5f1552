"""Host firewall rules that keep a deployment's containers away from the host's own services.

Docker's bridge lets a container open connections to the host itself (its gateway address,
or any of the host's addresses) and to the host's local network. The rules here close both,
for this deployment's bridge interface only:

* `3C-IN-<tag>`, jumped to from INPUT for packets arriving on the bridge: replies of
  connections the host opened (docker-proxy talking to a published port) pass; every new
  connection from a container to the host is dropped.
* `3C-FWD-<tag>`, jumped to from DOCKER-USER (FORWARD when Docker has no DOCKER-USER chain):
  replies pass; new connections to private, link-local (cloud metadata) and carrier-grade
  NAT ranges are dropped. The internet stays reachable.

Both chains are this deployment's own: installing flushes and refills them, and adds each
jump only if `iptables -C` does not find it, so a restart changes nothing. Nothing else in
the host's rules is touched. When the rules cannot be installed (not root, no iptables, an
iptables error) `install` says why in `status`, which /healthz shows; the caller logs it.
IPv4 only: Docker bridges get no IPv6 address unless the operator turns that on.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

PRIVATE_NETS = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "100.64.0.0/10")
REPLIES = ["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "RETURN"]

Runner = Callable[[Sequence[str]], subprocess.CompletedProcess]


class FirewallError(Exception):
    """An iptables command failed; the message is its error output."""


def _run_iptables(args: Sequence[str]) -> subprocess.CompletedProcess:
    return subprocess.run(["iptables", "-w", "5", *args], capture_output=True, text=True, timeout=15,
                          check=False)


class Firewall:
    """The INPUT and forwarding rules of one deployment's bridge interface."""

    def __init__(self, interface: str, tag: str, runner: Runner = _run_iptables) -> None:
        self.interface = interface
        self.input_chain = f"3C-IN-{tag}"
        self.forward_chain = f"3C-FWD-{tag}"
        self.runner = runner
        self.status = "off: not installed"

    def install(self) -> str:
        """Install (or refresh) the rules; returns and keeps "on" or "off: <reason>"."""
        reason = self._cannot_install()
        if reason is None:
            try:
                self._fill(self.input_chain, [REPLIES, ["-j", "DROP"]])
                self._fill(self.forward_chain, [REPLIES, *(["-d", net, "-j", "DROP"] for net in PRIVATE_NETS)])
                self._jump("INPUT", self.input_chain)
                self._jump(self._forward_parent(), self.forward_chain)
            except (FirewallError, OSError, subprocess.SubprocessError) as exc:
                reason = f"iptables failed: {exc}"
        self.status = "on" if reason is None else f"off: {reason}"
        return self.status

    def uninstall(self) -> None:
        """Remove this deployment's jumps and chains (tests and operators; the server never does)."""
        for parent, chain in (("INPUT", self.input_chain), ("DOCKER-USER", self.forward_chain),
                              ("FORWARD", self.forward_chain)):
            while self._ok("-D", parent, *self._jump_rule(chain)):
                pass
        for chain in (self.input_chain, self.forward_chain):
            self._ok("-F", chain)
            self._ok("-X", chain)
        self.status = "off: removed"

    def _cannot_install(self) -> str | None:
        if os.geteuid() != 0:
            return "the server is not running as root"
        if self.runner is _run_iptables and shutil.which("iptables") is None:
            return "iptables is not installed"
        return None

    def _forward_parent(self) -> str:
        return "DOCKER-USER" if self._ok("-n", "-L", "DOCKER-USER") else "FORWARD"

    def _fill(self, chain: str, rules: list[list[str]]) -> None:
        if not self._ok("-n", "-L", chain):
            self._must("-N", chain)
        self._must("-F", chain)
        for rule in rules:
            self._must("-A", chain, "-i", self.interface, *rule)

    def _jump(self, parent: str, chain: str) -> None:
        if not self._ok("-C", parent, *self._jump_rule(chain)):
            self._must("-I", parent, "1", *self._jump_rule(chain))

    def _jump_rule(self, chain: str) -> list[str]:
        return ["-i", self.interface, "-j", chain]

    def _ok(self, *args: str) -> bool:
        return self.runner(args).returncode == 0

    def _must(self, *args: str) -> None:
        done = self.runner(args)
        if done.returncode != 0:
            message = (done.stderr or done.stdout or "").strip().splitlines()
            raise FirewallError(f"iptables {' '.join(args)}: {message[-1] if message else done.returncode}")
