"""Pipeline benchmark: cold time and peak memory per stage, and the cost of a no-op rerun.

Runs in a scratch copy of the project (a fresh git + DVC repo), so the checkout's own outputs and
`dvc.lock` are never touched. Cold: each stage by `dvc repro -s`, upstream first. No-op: `dvc repro`
of the same stages, then the Prefect flow (its first call starts Prefect's ephemeral server, the second
shows the steady cost).

    python bench/pipeline.py [--tiny] [--targets prepare evaluator] [--out bench/results/pipeline.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("condenser", "tasks", "flows", "dvc.yaml", "pyproject.toml", ".gitignore", ".dvcignore")


def scratch_project(dest: Path, params: dict | None = None, source: Path = ROOT) -> Path:
    """A committed git + DVC repo at `dest` holding the project's code and `params` (default: its own)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = source / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.is_file():
            shutil.copy2(src, dest / name)
    if params is None:
        shutil.copy2(source / "params.yaml", dest / "params.yaml")
    else:
        (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "bench@condenser.local"],
                ["git", "config", "user.name", "condenser bench"], [*dvc(), "init", "-q"],
                ["git", "add", "-A"], ["git", "commit", "-q", "-m", "scratch copy"]):
        subprocess.run(cmd, cwd=dest, check=True, env=stage_env())
    return dest


def dvc() -> list[str]:
    return [sys.executable, "-m", "dvc"]


def stage_env() -> dict[str, str]:
    """The environment `dvc repro` needs so a stage's `python -m tasks.X` uses this interpreter."""
    return {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}


def timed(cmd: list[str], cwd: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS in MiB of `cmd` and the children it waited for (the stage itself)."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=stage_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"`{' '.join(cmd)}` failed ({proc.returncode}):\n{output.decode()[-4000:]}")
    # ru_maxrss is in KiB on Linux.
    return wall, usage.ru_maxrss / 1024


def bench(root: Path, targets: list[str] | None) -> dict:
    sys.path.insert(0, str(ROOT))
    from flows.pipeline import stage_graph

    names = [s.name for s in stage_graph(root, targets)]
    stages = {}
    for name in names:
        wall, rss = timed([*dvc(), "repro", "--single-item", name], root)
        stages[name] = {"cold_s": round(wall, 2), "peak_rss_mib": round(rss, 1)}
        print(f"cold {name}: {wall:.1f} s, peak {rss:.0f} MiB", flush=True)

    noop_dvc, _ = timed([*dvc(), "repro", *names], root)
    flow_first, flow_steady, flow_stages = _noop_flows(root, targets)
    return {
        "stages": stages,
        "cold_total_s": round(sum(s["cold_s"] for s in stages.values()), 2),
        "peak_rss_mib": round(max(s["peak_rss_mib"] for s in stages.values()), 1),
        "noop_dvc_repro_s": round(noop_dvc, 2),
        "noop_flow_first_s": round(flow_first, 2),
        "noop_flow_s": round(flow_steady, 2),
        "noop_flow_executed": flow_stages,
    }


def _noop_flows(root: Path, targets: list[str] | None) -> tuple[float, float, list[str]]:
    # A private Prefect home: the ephemeral server's database stays inside the scratch folder.
    os.environ["PREFECT_HOME"] = str(root / ".prefect-home")
    from flows.pipeline import condenser_pipeline

    times, executed = [], []
    for _ in range(2):
        started = time.perf_counter()
        summary = condenser_pipeline(root=str(root), targets=targets)
        times.append(time.perf_counter() - started)
        executed = [s["stage"] for s in summary["stages"] if s["status"] == "executed"]
    return times[0], times[1], executed


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Pipeline benchmark ({result['params']} params, {result['cpus']} CPUs)")
    table.add_column("measure")
    table.add_column("seconds", justify="right")
    table.add_column("peak RSS MiB", justify="right")
    for name, s in result["stages"].items():
        table.add_row(f"cold {name}", f"{s['cold_s']:.1f}", f"{s['peak_rss_mib']:.0f}")
    table.add_row("cold total", f"{result['cold_total_s']:.1f}", f"{result['peak_rss_mib']:.0f}")
    table.add_row("no-op dvc repro", f"{result['noop_dvc_repro_s']:.1f}", "")
    table.add_row("no-op flow (first: starts server)", f"{result['noop_flow_first_s']:.1f}", "")
    table.add_row("no-op flow", f"{result['noop_flow_s']:.1f}", "")
    Console().print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tests' TINY_PARAMS instead of params.yaml")
    parser.add_argument("--targets", nargs="*", help="stages to run with their upstream (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "pipeline.json")
    parser.add_argument("--keep", action="store_true", help="keep the scratch project and print its path")
    args = parser.parse_args()

    params = None
    if args.tiny:
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import tiny_params

        params = tiny_params()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

    scratch = Path(tempfile.mkdtemp(prefix="condenser-bench-"))
    try:
        root = scratch_project(scratch / "project", params)
        result = {"params": "tiny" if args.tiny else "params.yaml", "targets": args.targets or "all",
                  "cpus": os.cpu_count(), "python": platform.python_version(),
                  # Other work on the machine slows every figure; this says how busy it was.
                  "load_average_1m_at_start": round(os.getloadavg()[0], 2),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S"), **bench(root, args.targets)}
    finally:
        if args.keep:
            print(f"scratch project kept at {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
