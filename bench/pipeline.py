"""Pipeline benchmark: cold time and peak memory per stage, the cost of a no-op rerun, and the commit trigger.

Cold (default): in a scratch copy of the project (a fresh git + DVC repo), so the checkout's own outputs and
`dvc.lock` are never touched: each stage by `dvc repro -s`, upstream first; then a no-op `dvc repro` of the same
stages and the Prefect flow (its first call starts Prefect's ephemeral server, the second shows the steady cost).

--noop: in this checkout, which must be up to date (`make pipeline` first; nothing is written): a no-op
`dvc repro`, `condenser run` as `make pipeline` runs it (ephemeral server started per run), and `condenser run`
against a running server (what `condenser serve` gives), with the flow's own breakdown of where the time goes.

--trigger: a tiny project (dvc.yaml's prepare and evaluator) served by `condenser serve` with the post-commit
hook installed; each of a few commits changing a param is timed from `git commit` to its flow run's start and end.

    python bench/pipeline.py [--tiny] [--targets prepare evaluator] [--noop] [--trigger]
    [--out bench/results/pipeline.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("condenser", "tasks", "flows", "dvc.yaml", "pyproject.toml", "prefect.yaml", ".gitignore",
                 ".dvcignore")


def scratch_project(dest: Path, params: dict | None = None, source: Path = ROOT,
                    stages: list[str] | None = None) -> Path:
    """A committed git + DVC repo at `dest` holding the project's code and `params` (default: its own);
    with `stages`, its dvc.yaml keeps only those (e.g. prepare and evaluator: a real pipeline in seconds)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = source / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.is_file():
            shutil.copy2(src, dest / name)
    if stages:
        dvc_file = yaml.safe_load((source / "dvc.yaml").read_text())
        unknown = sorted(set(stages) - set(dvc_file["stages"]))
        if unknown:
            raise ValueError(f"{source / 'dvc.yaml'}: no stage {', '.join(unknown)}")
        dvc_file["stages"] = {k: v for k, v in dvc_file["stages"].items() if k in stages}
        (dest / "dvc.yaml").write_text(yaml.safe_dump(dvc_file, sort_keys=False))
    if params is None:
        shutil.copy2(source / "params.yaml", dest / "params.yaml")
    else:
        (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "bench@condenser.local"],
                ["git", "config", "user.name", "condenser bench"], [*dvc(), "init", "-q"],
                # As the project's own .dvc/config: no usage analytics (DVC ignores DO_NOT_TRACK).
                [*dvc(), "config", "core.analytics", "false"],
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


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def bench_noop(root: Path, repeats: int = 3) -> dict:
    """No-op reruns of the whole pipeline in `root`, which must be up to date."""
    sys.path.insert(0, str(ROOT))
    from flows.serve import OFFLINE_ENV, free_port, start_server

    status = subprocess.run([*dvc(), "status"], cwd=root, env=stage_env(), capture_output=True, text=True)
    if "Data and pipelines are up to date" not in status.stdout:
        raise SystemExit(f"{root}: not up to date (`dvc status`); run `make pipeline` first:\n{status.stdout[-2000:]}")
    env = {**stage_env(), **OFFLINE_ENV, "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}
    env.pop("PREFECT_API_URL", None)
    run = [sys.executable, "-m", "condenser.cli", "run", "--root", str(root)]
    dvc_s = [timed([*dvc(), "repro"], root)[0] for _ in range(repeats)]
    ephemeral = [_flow_run(run, root, env) for _ in range(repeats)]
    with tempfile.TemporaryDirectory(prefix="condenser-bench-server-") as home:
        server, api_url = start_server("127.0.0.1", free_port(), {**env, "PREFECT_HOME": home}, root)
        try:
            served = [_flow_run(run, root, {**env, "PREFECT_API_URL": api_url}) for _ in range(repeats)]
        finally:
            server.stop()
    return {"noop_dvc_repro_s": dvc_s, "noop_flow_ephemeral_s": [r["wall_s"] for r in ephemeral],
            "noop_flow_served_s": [r["wall_s"] for r in served],
            "flow_breakdown_served": served[-1]["timings"], "flow_breakdown_ephemeral": ephemeral[-1]["timings"],
            "summary": {"noop_dvc_repro_s": round(median(dvc_s), 2),
                        "noop_flow_ephemeral_s": round(median([r["wall_s"] for r in ephemeral]), 2),
                        "noop_flow_served_s": round(median([r["wall_s"] for r in served]), 2)}}


def _flow_run(cmd: list[str], root: Path, env: dict) -> dict:
    """Wall seconds of one `condenser run`, and the flow's own breakdown (its printed timings)."""
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"`{' '.join(cmd)}` failed:\n{(done.stdout + done.stderr)[-3000:]}")
    # Prefect's console log (the flow's printed timings among it) goes to stderr.
    lines = (done.stdout + done.stderr).splitlines()
    found = [line for line in lines if "timings {" in line]
    timings = json.loads(found[-1].split("timings ", 1)[1]) if found else {}
    executed = [line for line in lines if "Running stage" in line]
    if executed:
        raise SystemExit(f"no-op run executed stages: {executed}")
    return {"wall_s": round(wall, 2), "timings": timings}


def bench_trigger(scratch: Path, commits: int = 3) -> dict:
    """Commit-to-run latency through `condenser serve` and the post-commit hook, on a tiny project."""
    import asyncio

    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    from conftest import tiny_params
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.hooks import install
    from flows.serve import free_port

    params = tiny_params()
    params["evaluator"]["epochs"] = 1
    root = scratch_project(scratch / "trigger", params, stages=["prepare", "evaluator"])
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {**stage_env(), "PREFECT_HOME": str(scratch / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    serve = subprocess.Popen([sys.executable, "-m", "condenser.cli", "serve", "--root", str(root), "--port",
                              str(port)], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)

    async def runs() -> list:
        with temporary_settings({PREFECT_API_URL: api_url}):
            async with get_client() as client:
                return await client.read_flow_runs(limit=50, sort=FlowRunSort.EXPECTED_START_TIME_ASC)

    results = []
    try:
        started = time.perf_counter()
        for line in serve.stdout:
            if "ready; Ctrl-C stops" in line:
                break
        else:
            raise SystemExit("condenser serve exited before it was ready")
        serve_ready = time.perf_counter() - started
        install(root, api_url)
        for epochs in range(2, 2 + commits):
            text = (root / "params.yaml").read_text()
            (root / "params.yaml").write_text(text.replace(f"epochs: {epochs - 1}", f"epochs: {epochs}", 1))
            subprocess.run(["git", "commit", "-qam", f"{epochs} epochs"], cwd=root, check=True)
            committed = time.time()
            sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                 check=True).stdout.strip()
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                run = next((r for r in asyncio.run(runs()) if r.parameters.get("sha") == sha), None)
                if run is not None and run.state.is_final():
                    break
                time.sleep(0.5)
            else:
                raise SystemExit(f"no finished flow run for {sha} within 600 s")
            results.append({"sha": sha[:12], "state": run.state_name,
                            "commit_to_start_s": round(run.start_time.timestamp() - committed, 2),
                            "commit_to_end_s": round(run.end_time.timestamp() - committed, 2)})
            print(f"commit {sha[:12]}: run started after {results[-1]['commit_to_start_s']} s, "
                  f"{run.state_name} after {results[-1]['commit_to_end_s']} s", flush=True)
    finally:
        os.killpg(serve.pid, signal.SIGINT)
        serve.wait(60)
    return {"serve_ready_s": round(serve_ready, 2), "commits": results,
            "summary": {"commit_to_run_start_s": round(median([r["commit_to_start_s"] for r in results]), 2)}}


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


def print_summary(title: str, figures: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, value in figures.items():
        table.add_row(key, json.dumps(value) if isinstance(value, dict) else f"{value}")
    Console().print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tests' TINY_PARAMS instead of params.yaml")
    parser.add_argument("--targets", nargs="*", help="stages to run with their upstream (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "pipeline.json")
    parser.add_argument("--keep", action="store_true", help="keep the scratch project and print its path")
    parser.add_argument("--noop", action="store_true", help="no-op reruns of this (up-to-date) checkout")
    parser.add_argument("--trigger", action="store_true", help="commit-to-run latency through condenser serve")
    args = parser.parse_args()
    if args.noop or args.trigger:
        # These update their own section of the results file; the cold figures stay.
        result = json.loads(args.out.read_text()) if args.out.is_file() else {}
        meta = {"cpus": os.cpu_count(), "load_average_1m_at_start": round(os.getloadavg()[0], 2),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if args.noop:
            result["noop"] = {**meta, **bench_noop(ROOT)}
            print_summary("No-op reruns of this checkout (median s)", result["noop"]["summary"]
                          | {"flow breakdown (served)": result["noop"]["flow_breakdown_served"]})
        if args.trigger:
            with tempfile.TemporaryDirectory(prefix="condenser-bench-") as scratch:
                result["trigger"] = {**meta, **bench_trigger(Path(scratch))}
            print_summary("Commit trigger (condenser serve + post-commit hook)", result["trigger"]["summary"])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
        return

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
