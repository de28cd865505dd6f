"""What every stage's `main()` shares: load params, run, turn known errors into a clear exit."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from condenser.config import ConfigError, Section, load_params
from condenser.io import StagePaths


class StageError(RuntimeError):
    """A stage that cannot go on; the message says what was wrong and what to change."""


def stage_main(stage: str, run: Callable[[Section, StagePaths], dict]) -> None:
    """Run a stage on its `params.yaml` section, from the project root (as `dvc repro` runs it).

    The whole file is validated first, so a typo anywhere fails before any work.
    """
    from condenser.data import DataError

    try:
        params = load_params(Path("params.yaml"))
        metrics = run(getattr(params, stage), StagePaths(Path.cwd()))
    except (ConfigError, StageError, DataError, FileNotFoundError) as err:
        print(f"{stage} failed: {err}", file=sys.stderr)
        sys.exit(1)
    print(f"{stage} done: " + ", ".join(f"{k}={v}" for k, v in _flat(metrics).items()))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, float):
            out[f"{prefix}{k}"] = round(v, 4)
        elif not isinstance(v, (list, str)):
            out[f"{prefix}{k}"] = v
    return out
