"""The firewall rules: what is installed, that a second install changes nothing, and the off states."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Sequence

import pytest

from threecompute.containers import firewall
from threecompute.containers.firewall import Firewall


class FakeIptables:
    """An in-memory iptables: chains of rules, enough for -N -F -A -I -C -D -L -X."""

    def __init__(self, chains: Sequence[str] = ("INPUT", "FORWARD", "DOCKER-USER"), fail_on: str = "") -> None:
        self.chains: dict[str, list[tuple[str, ...]]] = {name: [] for name in chains}
        self.fail_on = fail_on
        self.calls: list[tuple[str, ...]] = []

    def __call__(self, args: Sequence[str]) -> subprocess.CompletedProcess:
        args = tuple(args)
        self.calls.append(args)
        if self.fail_on and self.fail_on in args:
            return subprocess.CompletedProcess(args, 4, "", "iptables: Permission denied (you must be root).")
        return subprocess.CompletedProcess(args, 0 if self._apply(args) else 1, "", "")

    def _apply(self, args: tuple[str, ...]) -> bool:
        op, chain, rule = args[0], (args[2] if args[0] == "-n" else args[1]), args[2:]
        if op == "-n":
            return chain in self.chains
        if op == "-N":
            return self.chains.setdefault(chain, []) is not None
        if chain not in self.chains:
            return False
        rules = self.chains[chain]
        if op == "-I":
            rules.insert(int(rule[0]) - 1, rule[1:])
        elif op == "-A":
            rules.append(rule)
        elif op == "-F":
            rules.clear()
        elif op == "-X":
            del self.chains[chain]
        elif op in ("-C", "-D"):
            if rule not in rules:
                return False
            if op == "-D":
                rules.remove(rule)
        return True


def test_install_makes_two_chains_and_jumps_to_them():
    fake = FakeIptables()
    wall = Firewall("3c-abc", "abc", runner=fake)
    assert wall.install() == "on"
    assert fake.chains["INPUT"] == [("-i", "3c-abc", "-j", "3C-IN-abc")]
    assert fake.chains["DOCKER-USER"] == [("-i", "3c-abc", "-j", "3C-FWD-abc")]
    assert fake.chains["FORWARD"] == []
    assert fake.chains["3C-IN-abc"] == [
        ("-i", "3c-abc", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "RETURN"),
        ("-i", "3c-abc", "-j", "DROP"),
    ]
    forward = fake.chains["3C-FWD-abc"]
    assert forward[0][-1] == "RETURN" and ("-i", "3c-abc", "-d", "169.254.0.0/16", "-j", "DROP") in forward


def test_a_second_install_changes_nothing_and_keeps_other_rules():
    fake = FakeIptables()
    fake.chains["INPUT"].append(("-p", "tcp", "--dport", "22", "-j", "ACCEPT"))
    wall = Firewall("3c-abc", "abc", runner=fake)
    wall.install()
    before = {chain: list(rules) for chain, rules in fake.chains.items()}
    assert wall.install() == "on"
    assert fake.chains == before
    assert ("-p", "tcp", "--dport", "22", "-j", "ACCEPT") in fake.chains["INPUT"]


def test_without_docker_user_the_forward_chain_is_used():
    fake = FakeIptables(chains=("INPUT", "FORWARD"))
    Firewall("3c-abc", "abc", runner=fake).install()
    assert fake.chains["FORWARD"] == [("-i", "3c-abc", "-j", "3C-FWD-abc")]


def test_uninstall_removes_only_its_own():
    fake = FakeIptables()
    fake.chains["INPUT"].append(("-j", "ACCEPT"))
    wall = Firewall("3c-abc", "abc", runner=fake)
    wall.install()
    wall.uninstall()
    assert fake.chains == {"INPUT": [("-j", "ACCEPT")], "FORWARD": [], "DOCKER-USER": []}


def test_not_root_is_reported_not_raised(monkeypatch):
    monkeypatch.setattr(firewall.os, "geteuid", lambda: 1000)
    fake = FakeIptables()
    assert Firewall("3c-abc", "abc", runner=fake).install() == "off: the server is not running as root"
    assert fake.calls == []


def test_iptables_errors_are_reported_with_their_message():
    wall = Firewall("3c-abc", "abc", runner=FakeIptables(fail_on="-A"))
    status = wall.install()
    assert status.startswith("off: iptables failed:") and "Permission denied" in status
    assert wall.status == status


def test_missing_iptables_is_reported(monkeypatch):
    monkeypatch.setattr(firewall.shutil, "which", lambda name: None)
    assert Firewall("3c-abc", "abc").install() == "off: iptables is not installed"


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("iptables") is None, reason="needs root and iptables")
def test_real_iptables_install_is_idempotent_and_uninstall_is_clean():
    tag = uuid.uuid4().hex[:10]
    wall = Firewall(f"3c-{tag}", tag)

    def ours() -> list[str]:
        rules = subprocess.run(["iptables", "-w", "5", "-S"], capture_output=True, text=True, check=True).stdout
        return [line for line in rules.splitlines() if tag in line]

    try:
        assert wall.install() == "on", wall.status
        first = ours()
        assert wall.install() == "on"
        assert ours() == first
        assert sum(line.startswith("-A INPUT ") for line in first) == 1
        assert any(line.startswith(("-A DOCKER-USER ", "-A FORWARD ")) for line in first)
    finally:
        wall.uninstall()
    assert ours() == []
