"""Reproduction check: this checkout's metrics/ against another run's, ignoring run records and timings.

A refactor must not change a result, and a rerun on the same inputs must give the same one. This
compares every metrics file key by key with another run: a git revision of this repository
(`--rev f11e155`) or another project's metrics folder (`--folder /tmp/before/metrics`). The `run`
blocks (commit, wall time, machine) and timing keys (wall times, ms, s/pair, steps/s, speedups) vary
from run to run and are left out; everything else must be equal to the last digit.

    python bench/metrics_diff.py --rev HEAD~1 [--out bench/results/metrics_diff.json]
    python bench/metrics_diff.py --folder /path/to/other/metrics
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMING = re.compile(r"(wall_time|ms_per|seconds_per|steps_per_s|speedup|time_ratio|_ms$|latency)")


def comparable(value):
    """`value` without run records and timing keys, at any depth."""
    if isinstance(value, dict):
        return {k: comparable(v) for k, v in value.items() if k != "run" and not TIMING.search(k)}
    if isinstance(value, list):
        return [comparable(v) for v in value]
    return value


def differences(a, b, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            where = f"{path}.{k}" if path else k
            out += [f"{where}: only in one run"] if (k in a) != (k in b) else differences(a[k], b[k], where)
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} -> {b!r}"]


def other_run(rev: str | None, folder: Path | None) -> dict[str, dict]:
    """The other run's metrics files, by path relative to metrics/."""
    if folder is not None:
        return {p.relative_to(folder).as_posix(): json.loads(p.read_text()) for p in sorted(folder.rglob("*.json"))}
    names = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev, "metrics/"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    return {n.removeprefix("metrics/"): json.loads(subprocess.run(["git", "show", f"{rev}:{n}"], cwd=ROOT, check=True,
                                                                  capture_output=True, text=True).stdout)
            for n in names if n.endswith(".json")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--rev", help="a git revision of this repository")
    source.add_argument("--folder", type=Path, help="another run's metrics folder")
    parser.add_argument("--metrics", type=Path, default=ROOT / "metrics", help="this run's metrics folder")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "metrics_diff.json")
    args = parser.parse_args(argv)
    other = other_run(args.rev, args.folder)
    report = {}
    for name, theirs in other.items():
        mine = args.metrics / name
        report[name] = (["missing in this run"] if not mine.is_file()
                        else differences(comparable(theirs), comparable(json.loads(mine.read_text()))))
    width = max(map(len, report), default=10)
    for name, diffs in report.items():
        print(f"{name:<{width}}  {'identical' if not diffs else f'{len(diffs)} differences'}")
        for d in diffs[:5]:
            print(f"{'':<{width}}    {d}")
    total = sum(map(len, report.values()))
    print(f"{len(report)} metrics files against {args.rev or args.folder}: {total} differences "
          "(run records and timing keys ignored)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"against": str(args.rev or args.folder), "differences": report}, indent=2) + "\n")
    return 0 if total == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
