"""The router at fleet scale, on one CPU machine: placement, load tracking, a fleet simulation.

    python -m benchmarks.bench_fleet --placement --shards 1000,10000 --out fleet_placement.json

`--placement`: the router's placement index on N shards in steady state (`fleet_placement`);
prints `placement_p50_us` per fleet size.

    python -m benchmarks.bench_fleet --tracking --shards 1000 --changes-per-s 0,6

`--tracking`: a real router process holding N simulated shards' load streams
(`fleet_tracking`, `sim_shards`): its CPU per snapshot and in total, per change rate.

    python -m benchmarks.bench_fleet --simulate --shards 100 --out fleet_sim.json

`--simulate`: Punica's cluster experiment as a discrete-event simulation (`fleet_sim`) under
both policies; writes the Fig. 13-like plot beside the JSON (`.png`).

    python -m benchmarks.bench_fleet --streams 10000 --out fleet_streams.json

`--streams N`: one real router process holding N concurrent streams against fake shards on
loopback (`fleet_streams`): failures, memory per stream, CPU per stream and per message.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

from benchmarks import (
    fleet_model,
    fleet_placement,
    fleet_plot,
    fleet_sim,
    fleet_streams,
    fleet_tracking,
)
from benchmarks.serving_procs import machine
from benchmarks.timing import git_commit
from router.config import Policy

MACHINE_NAME = "2-core CPU VM"


def _header(command: list[str], commit: str | None, name: str) -> dict[str, object]:
    return {
        "benchmark": name,
        "machine_name": MACHINE_NAME,
        "machine": machine(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": commit or git_commit(),
        "command": shlex.join(["python", "-m", "benchmarks.bench_fleet", *command]),
    }


def _sizes(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def _simulate(args: argparse.Namespace) -> dict[str, object]:
    (shards,) = _sizes(args.shards)
    fleet = fleet_model.Fleet(shards=shards, duration_s=args.duration_s, peak_rate=args.peak_rate)
    sims = {p.value: fleet_sim.Simulation(fleet, p) for p in Policy}
    results = {}
    for name, sim in sims.items():
        start = time.perf_counter()
        results[name] = sim.run() | {"wall_s": round(time.perf_counter() - start, 1)}
    plotted = None
    if args.out is not None:
        png = args.out.with_suffix(".png")
        plotted = str(png) if fleet_plot.plot(sims, fleet, str(png)) else None
    return {
        "fleet": dataclasses.asdict(fleet),
        "step_model": dataclasses.asdict(fleet_model.StepModel()),
        "policies": results,
        "plot": plotted,
    }


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--placement", action="store_true", help="time the placement index")
    mode.add_argument("--tracking", action="store_true", help="router CPU of load tracking")
    mode.add_argument("--simulate", action="store_true", help="the fleet simulation")
    mode.add_argument("--streams", type=int, help="concurrent streams through one router")
    parser.add_argument("--shards", default="1000", help="comma list of fleet sizes")
    parser.add_argument("--policy", default="consolidate", choices=[p.value for p in Policy])
    parser.add_argument("--requests", type=int, default=20_000, help="placements timed per size")
    parser.add_argument(
        "--compare-rule", action="store_true", help="also time the pure rule's full scan"
    )
    parser.add_argument(
        "--changes-per-s", default="6", help="tracking: comma list of load changes/s per shard"
    )
    parser.add_argument("--window-s", type=float, default=20.0, help="tracking: seconds measured")
    parser.add_argument(
        "--full-residency", action="store_true", help="tracking: shards send full adapter lists"
    )
    parser.add_argument("--duration-s", type=float, default=600.0, help="simulate: seconds")
    parser.add_argument("--peak-rate", type=float, default=1200.0, help="simulate: arrivals/s")
    parser.add_argument("--tokens", type=int, default=3, help="streams: tokens per stream")
    parser.add_argument(
        "--token-delay-s", type=float, default=15.0, help="streams: seconds between tokens"
    )
    parser.add_argument("--fakes", type=int, default=4, help="streams: fake shards")
    parser.add_argument(
        "--open-per-s", type=float, default=500.0, help="streams: new streams a second"
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    parser.add_argument("--commit", default=None, help="default: git rev-parse HEAD")
    command = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(command)
    if args.placement:
        report = _header(command, args.commit, "fleet_placement")
        runs = [
            fleet_placement.run(
                n, Policy(args.policy), args.requests, compare_rule=args.compare_rule
            )
            for n in _sizes(args.shards)
        ]
        report["runs"] = runs
        if len(runs) == 1:
            report |= {"placement_p50_us": runs[0]["placement_p50_us"]}
    elif args.streams:
        report = _header(command, args.commit, "fleet_streams")
        report |= fleet_streams.run(
            args.streams, args.fakes, args.tokens, args.token_delay_s, args.open_per_s
        )
    elif args.simulate:
        report = _header(command, args.commit, "fleet_sim")
        report |= _simulate(args)
    else:
        report = _header(command, args.commit, "fleet_tracking")
        report["runs"] = [
            fleet_tracking.run(n, float(rate), args.window_s, args.full_residency)
            for n in _sizes(args.shards)
            for rate in args.changes_per_s.split(",")
        ]
    print(json.dumps(report, indent=2))
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
