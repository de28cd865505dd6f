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
    root: Path = ROOT_OPTION,
) -> None:
    """Run the pipeline as a Prefect flow (the ephemeral server, or PREFECT_API_URL's)."""
    from flows.pipeline import StageFailed, condenser_pipeline

    try:
        condenser_pipeline(root=str(root.absolute()), targets=targets or None, force=force,
                           max_parallel=max_parallel)
    except (StageFailed, ValueError) as err:
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
