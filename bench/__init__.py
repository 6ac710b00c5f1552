"""Benchmarks of the 3Compute server, side by side with terminado and the raw PTY floor.

`python -m bench.run_all` (or `make bench`) runs them all against servers it starts itself
and writes JSON under `results/`; each module also runs alone (`python -m bench.echo -h`).
"""
