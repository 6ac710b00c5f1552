"""Keystroke echo and `seq 1 300000`, 3Compute vs ttyd, the Python floor, terminado and the raw PTY,
at 1/50/200 terminals.

    python -m bench.echo [--backend docker|local] [--levels 1,50,200] [--keystrokes 400] [--seq-reps 5]

Five clients type into tmux sessions of the same container through the same
`docker exec -it ... tmux new-session -A` command (the backend's own `attach_command`):
our server (WebSocket → PTY → docker exec → tmux), ttyd (C, libwebsockets; found through
TTYD=path, default ../shared/peers/ttyd, skipped with a message when missing), the Python
floor (bench/floor_server.py: the least a Python relay can do, in our frames) and terminado
serving that command (each its own process, like ours), and the raw floor, a PTY in this
process with no WebSocket. At each level N, N-1 idle terminals are open on ours, ttyd and
terminado (spread over users, 50 per container), one is measured on each; the floors have
only their measured one. Keystrokes alternate between the clients one by
one (and `seq` runs likewise), so a noisy moment on the machine hurts all alike; who goes
first changes every round, and the round after each line clear is not timed (see
`interleaved_echoes`). Memory of the servers and their PTY children is sampled at each
level, before and after the measurements (bench/memory.py reads them).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from bench.common import (
    AttachSpec,
    FloorTerminal,
    OurTerminal,
    RawTerminal,
    ServerProcess,
    SpecServerProcess,
    TermClient,
    TerminadoTerminal,
    TerminalClosed,
    TtydProcess,
    attach_spec,
    children_memory,
    container_of,
    dev_login,
    echo_once,
    machine_info,
    process_memory,
    ratio,
    run_main,
    running_server,
    running_spec_server,
    running_ttyd,
    summarize,
    ttyd_missing_message,
    ttyd_path,
    visible,
    wait_first_output,
    write_json,
)

PER_USER = 50  # terminals per user (container) for the idle ones
OPEN_CONCURRENCY = 8
ATTACH_TIMEOUT = 60.0
SEQ_COMMAND = "seq 1 300000"
SEQ_TIMEOUT = 90.0
LETTERS = "abcdefgijknopqrstuvwxyz"
CLEAR_EVERY = 40
KINDS = ("3compute", "ttyd", "python-floor", "terminado", "raw")
SERVERS = ("3compute", "ttyd", "terminado")  # the ones with idle terminals and memory


def log(message: str) -> None:
    print(f"[echo] {message}", file=sys.stderr, flush=True)


@dataclass
class Rig:
    """The servers, the users, the measured terminals and the idle ones."""

    server: ServerProcess
    terminado: SpecServerProcess
    floor: SpecServerProcess
    emails: list[str]
    cookies: list[str]
    measured: dict[str, TermClient] = field(default_factory=dict)
    idle: dict[str, list[TermClient]] = field(default_factory=lambda: {"3compute": [], "terminado": []})
    refs: dict[str, str] = field(default_factory=dict)  # email -> container id
    ttyd: TtydProcess | None = None

    @property
    def kinds(self) -> list[str]:
        return [k for k in KINDS if k != "ttyd" or self.ttyd is not None]

    def spec(self, user: int, tab: str) -> AttachSpec:
        """The attach command for a tab of user `user`, whose container exists."""
        email = self.emails[user]
        if self.server.backend == "docker" and email not in self.refs:
            self.refs[email] = container_of(self.server.deployment, email) or ""
        return attach_spec(self.server, email, tab, self.refs.get(email) or None)

    async def make_boxes(self) -> None:
        """Every user's container, made by our server (one short-lived terminal each)."""
        terms = await asyncio.gather(*(self.open_ours(u * PER_USER, "boot") for u in range(len(self.emails))))
        for term in terms:
            term.close()

    async def open_ours(self, index: int, tab: str) -> TermClient:
        user = index // PER_USER
        term = await OurTerminal.open(self.server.ws_url, self.cookies[user], tab, ATTACH_TIMEOUT)
        await wait_first_output(term, ATTACH_TIMEOUT)
        return term

    async def open_terminado(self, index: int, tab: str) -> TermClient:
        term = await self.terminado.open(tab, self.spec(index // PER_USER, tab))
        await wait_first_output(term, ATTACH_TIMEOUT)
        return term

    async def open_ttyd(self, index: int, tab: str) -> TermClient:
        assert self.ttyd is not None
        term = await self.ttyd.open(self.spec(index // PER_USER, tab))
        await wait_first_output(term, ATTACH_TIMEOUT)
        return term

    async def open_floor(self, tab: str) -> TermClient:
        term = await self.floor.open(tab, self.spec(0, tab))
        await wait_first_output(term, ATTACH_TIMEOUT)
        return term

    def open_raw(self, tab: str) -> TermClient:
        spec = self.spec(0, tab)
        return RawTerminal(spec.argv, spec.env)

    async def grow_idle(self, count: int) -> float:
        """Open idle terminals until each server has `count`; seconds it took."""
        started = time.perf_counter()
        gate = asyncio.Semaphore(OPEN_CONCURRENCY)

        async def one(kind: str, index: int) -> None:
            async with gate:
                opener = {"3compute": self.open_ours, "ttyd": self.open_ttyd, "terminado": self.open_terminado}[kind]
                tab = {"3compute": "i", "ttyd": "y", "terminado": "t"}[kind] + str(index)
                self.idle[kind].append(await opener(index, tab))

        jobs = [one(kind, i) for kind in self.idle for i in range(len(self.idle[kind]), count)]
        await asyncio.gather(*jobs)
        return time.perf_counter() - started

    def close_all(self) -> None:
        for term in [*self.measured.values(), *(t for idle in self.idle.values() for t in idle)]:
            with contextlib.suppress(Exception):
                term.close()


async def make_rig(server: ServerProcess, max_level: int, stack: contextlib.ExitStack) -> Rig:
    users = max(1, math.ceil(max_level / PER_USER))
    emails = [f"bench{i}@example.com" for i in range(users)]
    cookies = list(await asyncio.gather(*(dev_login(server.base_url, e) for e in emails)))
    rig = Rig(server=server, emails=emails, cookies=cookies,
              terminado=stack.enter_context(running_spec_server("bench.terminado_server", TerminadoTerminal,
                                                                server.root)),
              floor=stack.enter_context(running_spec_server("bench.floor_server", FloorTerminal, server.root)))
    await rig.make_boxes()
    binary = ttyd_path()
    if binary is None:
        log(ttyd_missing_message())
    else:
        rig.ttyd = stack.enter_context(running_ttyd(binary, rig.spec(0, "yprobe")))
        rig.idle["ttyd"] = []
    rig.measured["3compute"] = await rig.open_ours(0, "m1")
    if rig.ttyd is not None:
        rig.measured["ttyd"] = await rig.open_ttyd(0, "ym1")
    rig.measured["python-floor"] = await rig.open_floor("fm1")
    rig.measured["terminado"] = await rig.open_terminado(0, "tm1")
    rig.measured["raw"] = rig.open_raw("rm1")
    await wait_first_output(rig.measured["raw"], ATTACH_TIMEOUT)
    for term in rig.measured.values():
        await term.settle(0.3)
    return rig


# -- the measurements ----------------------------------------------------------------------


async def clear_line(term: TermClient) -> None:
    try:
        await term.send("\x15")  # Ctrl-U: the shell empties its line
    except TerminalClosed as exc:
        raise TerminalClosed(f"{term.kind}'s measured terminal: {exc}") from exc
    await term.settle(0.05, 2.0)


def turn_order(kinds: list[str], keystroke: int) -> list[str]:
    """Who types first moves round by round, so that no client always follows the same one."""
    start = keystroke % len(kinds)
    return kinds[start:] + kinds[:start]


async def interleaved_echoes(terms: dict[str, TermClient], count: int) -> tuple[dict[str, list[float]],
                                                                               dict[str, int]]:
    """`count` keystrokes into each terminal, taking turns one keystroke at a time, each
    waiting for its echo; lines are emptied now and then. An echo that never comes (5 s)
    is counted as lost, not sampled. The round after each line clear is typed but not
    timed: after the clears' quiet spell the first keystroke is 2-4 ms slower for whoever
    types it, the machine's idle CPUs and caches waking up, whichever server it goes to."""
    samples: dict[str, list[float]] = {kind: [] for kind in terms}
    lost = dict.fromkeys(terms, 0)
    for i in range(count):
        if i % CLEAR_EVERY == 0:
            for term in terms.values():
                await clear_line(term)
            await echo_round(terms, i, dict.fromkeys(terms, 0))  # untimed; its losses not counted
        for kind, seconds in (await echo_round(terms, i, lost)).items():
            samples[kind].append(seconds)
    for term in terms.values():
        await clear_line(term)
    return samples, lost


async def echo_round(terms: dict[str, TermClient], keystroke: int, lost: dict[str, int]) -> dict[str, float]:
    """One keystroke into each terminal, in turn order: the echo times of those that came
    (an echo that never comes is counted in `lost` and its line emptied)."""
    times: dict[str, float] = {}
    for kind in turn_order(list(terms), keystroke):
        term = terms[kind]
        try:
            times[kind] = await echo_once(term, LETTERS[keystroke % len(LETTERS)])
        except TerminalClosed as exc:
            raise TerminalClosed(f"{kind}'s measured terminal: {exc}") from exc
        except TimeoutError:
            lost[kind] += 1
            await clear_line(term)
    return times


async def seq_once(term: TermClient, tag: str) -> dict[str, float]:
    """Run `seq 1 300000` and time it until a marker printed after it arrives."""
    await term.send("clear\r")
    await term.settle(0.2)
    marker = f"SEQ{tag}DONE"
    term.mark()
    term.trim()
    before = term.bytes_in
    future = term.expect(lambda out: marker in visible(out[-8192:]))
    started = time.perf_counter()
    await term.send(f"{SEQ_COMMAND}; echo SEQ{tag}''DONE\r")
    arrived = await asyncio.wait_for(future, SEQ_TIMEOUT)
    await term.settle(0.2)
    term.mark()
    term.trim()
    return {"seconds": arrived - started, "bytes": term.bytes_in - before}


def memory_snapshot(rig: Rig) -> dict[str, Any]:
    pids = {"3compute": rig.server.pid, "terminado": rig.terminado.pid}
    if rig.ttyd is not None:
        pids["ttyd"] = rig.ttyd.pid
    return {who: {"server": process_memory(pid), "children": children_memory(pid)} for who, pid in pids.items()}


async def measure_level(rig: Rig, level: int, keystrokes: int, seq_reps: int) -> dict[str, Any]:
    opened_in = await rig.grow_idle(level - 1)
    log(f"level {level}: {level - 1} idle terminals on each server (opened in {opened_in:.1f} s)")
    await asyncio.sleep(1.0)  # let the idle ones finish drawing
    memory = memory_snapshot(rig)
    echoes, lost = await interleaved_echoes({kind: rig.measured[kind] for kind in rig.kinds}, keystrokes)
    seqs: dict[str, list[dict[str, float]]] = {k: [] for k in rig.kinds}
    for rep in range(seq_reps):
        for kind in rig.kinds:
            seqs[kind].append(await seq_once(rig.measured[kind], f"{level}x{rep}"))
    result = {"level": level, "idle_open_seconds": round(opened_in, 2), "memory": memory,
              "memory_after": memory_snapshot(rig),
              "echo_ms": {k: summarize(v) for k, v in echoes.items()},
              "echo_lost": lost,
              "seq": {k: seq_summary(v) for k, v in seqs.items()}}
    result["ratios"] = level_ratios(result)
    log(f"level {level}: " + ", ".join(f"{k} echo p50 {result['echo_ms'][k]['p50']} ms, "
                                         f"seq {result['seq'][k]['median_s']} s" for k in rig.kinds))
    return result


def seq_summary(runs: list[dict[str, float]]) -> dict[str, Any]:
    times = sorted(r["seconds"] for r in runs)
    return {"runs": len(runs), "median_s": round(times[len(times) // 2], 3), "min_s": round(times[0], 3),
            "max_s": round(times[-1], 3), "bytes_median": sorted(r["bytes"] for r in runs)[len(runs) // 2]}


def level_ratios(result: dict[str, Any]) -> dict[str, float | None]:
    echo, seq = result["echo_ms"], result["seq"]
    ttyd, floor = echo.get("ttyd", {}), echo["python-floor"]
    return {
        "echo_p50_vs_ttyd": ratio(echo["3compute"]["p50"], ttyd.get("p50")),
        "echo_p50_vs_floor": ratio(echo["3compute"]["p50"], floor["p50"]),
        "floor_p50_vs_ttyd": ratio(floor["p50"], ttyd.get("p50")),
        "floor_p99_vs_raw": ratio(floor["p99"], echo["raw"]["p99"]),
        "ttyd_p99_vs_raw": ratio(ttyd.get("p99"), echo["raw"]["p99"]),
        "echo_p99_vs_ttyd": ratio(echo["3compute"]["p99"], ttyd.get("p99")),
        "echo_p99_vs_raw": ratio(echo["3compute"]["p99"], echo["raw"]["p99"]),
        "ttyd_p50_vs_raw": ratio(ttyd.get("p50"), echo["raw"]["p50"]),
        "seq_vs_ttyd": ratio(seq["3compute"]["median_s"], seq.get("ttyd", {}).get("median_s")),
        "floor_seq_vs_ttyd": ratio(seq["python-floor"]["median_s"], seq.get("ttyd", {}).get("median_s")),
        "echo_p50_vs_terminado": ratio(echo["3compute"]["p50"], echo["terminado"]["p50"]),
        "echo_p50_vs_raw": ratio(echo["3compute"]["p50"], echo["raw"]["p50"]),
        "echo_p99_vs_terminado": ratio(echo["3compute"]["p99"], echo["terminado"]["p99"]),
        "terminado_p50_vs_raw": ratio(echo["terminado"]["p50"], echo["raw"]["p50"]),
        "seq_vs_terminado": ratio(seq["3compute"]["median_s"], seq["terminado"]["median_s"]),
        "seq_vs_raw": ratio(seq["3compute"]["median_s"], seq["raw"]["median_s"]),
    }


async def run_levels(server: ServerProcess, levels: list[int], keystrokes: int, seq_reps: int) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        rig = await make_rig(server, max(levels), stack)
        try:
            results, failed = [], None
            for lv in sorted(levels):
                try:
                    results.append(await measure_level(rig, lv, keystrokes, seq_reps))
                except Exception as exc:  # the levels measured so far are kept
                    if not results:
                        raise
                    failed = {"level": lv, "error": f"{type(exc).__name__}: {exc}"}
                    log(f"level {lv} failed: {failed['error']}; keeping the levels before it")
                    break
        finally:
            rig.close_all()
            await asyncio.sleep(1.0)  # the servers hang up and detach what was open
    return {"levels": results, "failed_level": failed, "settings": {"keystrokes": keystrokes, "seq_reps": seq_reps,
                                            "seq_command": SEQ_COMMAND, "per_user": PER_USER}}


def print_table(data: dict[str, Any]) -> None:
    print(f"{'terminals':>9} {'who':<10} {'echo p50':>9} {'p95':>7} {'p99':>7} {'max':>7} {'seq s':>7}")
    for level in data["levels"]:
        for kind in [k for k in KINDS if k in level["echo_ms"]]:
            e, s = level["echo_ms"][kind], level["seq"][kind]
            print(f"{level['level']:>9} {kind:<10} {e['p50']:>9.2f} {e['p95']:>7.2f} {e['p99']:>7.2f} "
                  f"{e['max']:>7.2f} {s['median_s']:>7.2f}")
        r = level["ratios"]
        print(f"{'':>9} ratios: echo p50 {r['echo_p50_vs_ttyd']}x ttyd, {r['echo_p50_vs_terminado']}x terminado, "
              f"{r['echo_p50_vs_raw']}x raw; p99 {r['echo_p99_vs_raw']}x raw; seq {r['seq_vs_ttyd']}x ttyd, "
              f"{r['seq_vs_terminado']}x terminado")
        print(f"{'':>9} the Python floor: echo p50 {r['floor_p50_vs_ttyd']}x ttyd (ours {r['echo_p50_vs_floor']}x "
              f"the floor), p99 {r['floor_p99_vs_raw']}x raw (ttyd {r['ttyd_p99_vs_raw']}x); seq "
              f"{r['floor_seq_vs_ttyd']}x ttyd")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("docker", "local"), default="docker")
    parser.add_argument("--levels", default="1,50,200", help="open terminals to measure at (max 400)")
    parser.add_argument("--keystrokes", type=int, default=400, help="per client and level (max 5000)")
    parser.add_argument("--seq-reps", type=int, default=5)
    args = parser.parse_args(argv)
    args.levels = sorted({min(400, max(1, int(x))) for x in args.levels.split(",")})
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with running_server(args.backend) as server:
        data = asyncio.run(run_levels(server, args.levels, min(args.keystrokes, 5000), min(args.seq_reps, 20)))
    data |= {"backend": args.backend, "machine": machine_info()}
    print_table(data)
    print(f"wrote {write_json('echo', data)}")


if __name__ == "__main__":
    run_main(main)
