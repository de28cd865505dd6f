"""The `condenser` command: run the pipeline, trace an artifact's lineage, show where stages stand.

Heavy imports (prefect, dvc) happen inside the commands, so `condenser lineage` stays fast.
"""

from __future__ import annotations

import json
import os
from contextlib import chdir
from pathlib import Path

import typer

app = typer.Typer(help="Condenser: compress text-to-image diffusion models, reproducibly.",
                  no_args_is_help=True, add_completion=False)

ROOT_OPTION = typer.Option(Path("."), "--root", help="The DVC project (folder holding dvc.yaml).")


@app.command()
def run(
    targets: list[str] = typer.Argument(None, help="Stages to run, with their upstream (default: all)."),
    force: bool = typer.Option(False, "--force", help="Rerun stages even when DVC finds them up to date."),
    max_parallel: int = typer.Option(1, "--max-parallel", min=1,
                                     help="Sibling stages run at once (one machine: keep 1)."),
    wait: bool = typer.Option(False, "--wait", help="If another run of this checkout is going on, queue behind "
                              "it instead of refusing."),
    root: Path = ROOT_OPTION,
) -> None:
    """Run the pipeline as a Prefect flow (the ephemeral server, or PREFECT_API_URL's)."""
    # A first run creates the ephemeral server's database; on a busy 2-core machine that takes longer than
    # Prefect's default 20 s wait.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    from flows.pipeline import CheckoutMismatch, PipelineBusy, StageFailed, condenser_pipeline

    try:
        condenser_pipeline(root=str(root.absolute()), targets=targets or None, force=force,
                           max_parallel=max_parallel, wait=wait)
    except (StageFailed, PipelineBusy, CheckoutMismatch, ValueError) as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(1) from None


@app.command()
def lineage(
    path: Path = typer.Argument(..., help="A stage output, a file inside one, or a metrics file."),
    as_json: bool = typer.Option(False, "--json", help="Print the lineage as JSON."),
) -> None:
    """Trace PATH back through dvc.lock to the raw inputs, params and commits (no server needed)."""
    from condenser.lineage import LineageError, render, trace

    try:
        found = trace(path)
    except LineageError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(1) from None
    typer.echo(json.dumps(found.to_dict(), indent=2) if as_json else render(found))


@app.command()
def status(root: Path = ROOT_OPTION) -> None:
    """Each stage: up to date or what changed (`dvc status`), and its last metrics."""
    from dvc.repo import Repo
    from rich.console import Console
    from rich.table import Table

    from condenser.lineage import LineageError, format_value, read_lock, read_metrics

    root = root.absolute()
    try:
        recorded = read_lock(root)
    except LineageError:
        recorded = {}
    # Repo resolves dvc.yaml against the working directory, not its argument.
    with chdir(root), Repo(os.fspath(root)) as repo:
        names = [s.addressing for s in repo.index.stages if getattr(s, "cmd", None)]
        stale = repo.status()
        table = Table(title=f"Condenser stages in {root}")
        for column in ("stage", "state", "last metrics"):
            table.add_column(column)
        for name in names:
            changes = stale.get(name)
            if name not in recorded:
                state = "[yellow]never run"
            elif changes:
                state = "[yellow]changed: " + _describe(changes)
            else:
                state = "[green]up to date"
            metrics = read_metrics(root, recorded[name]) if name in recorded else {}
            table.add_row(name, state, "\n".join(f"{k}={format_value(v)}" for k, v in metrics.items()))
    Console(width=140).print(table)


@app.command()
def serve(
    root: Path = ROOT_OPTION,
    host: str = typer.Option("127.0.0.1", "--host", help="Where the server listens (127.0.0.1: this machine only)."),
    port: int = typer.Option(4200, "--port", help="The server's port."),
    worker: bool = typer.Option(True, "--worker/--no-worker", help="Also start a worker that runs the flow runs."),
    verbose: bool = typer.Option(False, "--verbose", help="Echo the server's and worker's output."),
) -> None:
    """Serve the pipeline: a Prefect server (or PREFECT_API_URL's), the deployment of prefect.yaml (nightly
    schedule + git.commit trigger) and a worker. Ctrl-C stops what it started."""
    from flows.serve import ServeError, serve, wait_for_signal

    try:
        with serve(root, host=host, port=port, worker=worker, echo=typer.echo if verbose else None) as services:
            typer.echo(f"Prefect UI: {services.ui_url}  (API {services.api_url})")
            deployment = services.deployment
            for schedule in deployment.get("schedules", []):
                typer.echo(f"deployment {deployment['name']}: cron '{schedule['cron']}' {schedule['timezone']}, "
                           f"next run {schedule['next']}")
            typer.echo(f"commit trigger: git.commit events for {services.root}; install the hook with "
                       f"`condenser hooks install --api-url {services.api_url}`")
            typer.echo("worker: " + ("running on pool condenser" if worker else "not started (--no-worker)"))
            typer.echo("ready; Ctrl-C stops")
            wait_for_signal(services)
            typer.echo("stopping")
    except ServeError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(1) from None
    typer.echo("stopped")


hooks_app = typer.Typer(help="The git post-commit hook that triggers the pipeline's deployment.",
                        no_args_is_help=True)
app.add_typer(hooks_app, name="hooks")


@hooks_app.command("install")
def hooks_install(
    root: Path = ROOT_OPTION,
    api_url: str = typer.Option(None, "--api-url", help="The Prefect API the hook posts to when the committing "
                                "shell has no PREFECT_API_URL (default http://127.0.0.1:4200/api)."),
) -> None:
    """Write .git/hooks/post-commit: after a commit that changes pipeline inputs, send a git.commit event.
    It runs in the background and never blocks or fails a commit."""
    from flows.hooks import HookError, install

    try:
        hook = install(root, api_url)
    except HookError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(1) from None
    typer.echo(f"installed {hook}; its log: .git/condenser-hook.log")


@hooks_app.command("uninstall")
def hooks_uninstall(root: Path = ROOT_OPTION) -> None:
    """Remove Condenser's lines from .git/hooks/post-commit (other tools' lines stay)."""
    from flows.hooks import HookError, uninstall

    try:
        hook = uninstall(root)
    except HookError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(1) from None
    typer.echo(f"removed from {hook}" if hook else "no post-commit hook installed")


@app.command()
def report(
    root: Path = ROOT_OPTION,
    screenshot: Path = typer.Option(None, "--screenshot", help="Also render the page in headless Chromium and "
                                    "save a screenshot (PNG) there."),
) -> None:
    """The report in the terminal: per deliverable the chain's headline ratios, per target pass/fail."""
    from condenser.report import summary

    root = root.absolute()
    html = root / "data" / "report" / "report.html"
    if not html.is_file():
        typer.echo(f"{html}: missing; run the pipeline (`condenser run`) or `dvc repro report` first", err=True)
        raise typer.Exit(1)
    typer.echo(summary(root))
    typer.echo(f"\nthe page: {html}")
    if screenshot is not None:
        from condenser.report.browser import open_in_browser

        open_in_browser(html, screenshot)
        typer.echo(f"screenshot: {screenshot}")


@app.command()
def compare(
    root: Path = ROOT_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print the comparison as JSON."),
) -> None:
    """Experiments side by side (`dvc exp run -S key=value`): per deliverable each level's quality, size and
    latency in the baseline (HEAD) and every experiment on it, the params that differ and each target's gate."""
    from condenser.experiments import CompareError, tables
    from condenser.experiments import compare as compare_experiments

    try:
        found = compare_experiments(root.absolute())
    except CompareError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(found, indent=2))
        return
    from rich.console import Console

    console = Console(width=160)
    for table in tables(found):
        console.print(table)
    for s in found["skipped"]:
        console.print(f"left out: {s['name']} ({s['rev'][:7]}): {s['reason']}")


def _describe(changes: list) -> str:
    parts = []
    for change in changes:
        if isinstance(change, str):
            parts.append(change)
        else:
            for kind, paths in change.items():
                parts.append(f"{kind} " + ", ".join(f"{p} ({_what(c)})" for p, c in paths.items()))
    return "; ".join(parts)


def _what(change: str | dict) -> str:
    # A params file reports a change per section: {"evaluator": "modified"}.
    return change if isinstance(change, str) else ", ".join(f"{k} {v}" for k, v in change.items())


if __name__ == "__main__":
    app()
