"""What every stage's `main()` shares: load params, run, turn known errors into a clear exit."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from condenser.config import ConfigError, Section, load_params
from condenser.io import StagePaths


class StageError(RuntimeError):
    """A stage that cannot go on; the message says what was wrong and what to change."""


def stage_main(stage: str, run: Callable[..., dict], items: str | None = None) -> None:
    """Run a stage on its `params.yaml` section, from the project root (as `dvc repro` runs it).

    The whole file is validated first, so a typo anywhere fails before any work. A foreach stage
    (`distill_data@bold`) names its `items` field; the item comes as the one command-line argument.
    """
    from condenser.data import DataError

    try:
        params = load_params(Path("params.yaml"))
        cfg: Section = getattr(params, stage)
        args = [StagePaths(Path.cwd())]
        if items:
            known = getattr(cfg, items)
            if len(sys.argv) != 2 or sys.argv[1] not in known:
                given = sys.argv[1] if len(sys.argv) > 1 else "nothing"
                raise StageError(f"usage: python -m tasks.{stage} ITEM, where ITEM is one of "
                                 f"{stage}.{items} in params.yaml ({', '.join(known)}); got {given}")
            args.append(sys.argv[1])
        metrics = run(cfg, *args)
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
