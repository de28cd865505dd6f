"""The stage contract, written once: every task's `run()` goes through a `Stage`.

A stage reads inputs, writes one output folder (`data/<stage>[/<item>]`) atomically with a
`manifest.json`, writes a metrics file with a run record, and maybe plots (docs/architecture.md,
"The stage contract"). `Stage` does the bookkeeping so no task re-types it:

    stage = Stage("gan_base", paths, cfg.model_dump(), seed=cfg.seed)
    stage.add_input(paths.data("evaluator"))
    accelerator = stage.accelerator(mixed_precision=cfg.mixed_precision)   # its device goes in the manifest
    ...
    with stage.output(artifact="base GAN editor ...") as tmp:              # manifest written, folder renamed
        save(model, tmp)
    save_grid(images, stage.plots / "edits.png")
    return stage.finish(metrics)                                            # metrics + run record

`stage_main` is what every `python -m tasks.<stage>` calls: load params.yaml (all of it, so a typo anywhere
fails before any work), run, and turn the known errors into one clear line and exit code 2 (`INPUT_ERROR`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from condenser.core.config import Section, load_params
from condenser.core.environment import git_revision, library_versions, machine
from condenser.core.errors import ConfigError, DataError, StageError
from condenser.core.io import StagePaths, atomic_dir, md5_path, write_json

# A stage that fails on its input (params, data, a missing file) exits with this: the flow never retries it.
INPUT_ERROR = 2
MANIFEST_FILE = "manifest.json"
# What changes between reruns on the same inputs: never in manifest.json (DVC hashes it), always in
# the metrics file's "run" block.
RUN_FIELDS = ("git_revision", "wall_time_s", "machine")


class Stage:
    """One run of a stage (or of one foreach item) on a project root.

    The manifest holds only what the inputs, params and code determine, so a rerun on the same ones
    gives the same bytes and DVC reruns nothing downstream: artifact, input md5s, params, seed, the
    device the work ran on, library versions. The volatile part (commit, wall time, machine) is the run
    record, which goes into the metrics file.
    """

    def __init__(self, name: str, paths: StagePaths, params: dict, seed: int | None = None,
                 item: str | None = None):
        self.name, self.paths, self.params, self.seed, self.item = name, paths, params, seed, item
        self.inputs: dict[str, str] = {}
        self.device = "cpu"
        self.started = time.perf_counter()

    @property
    def output_dir(self) -> Path:
        return self.paths.data(self.name, self.item)

    @property
    def metrics_file(self) -> Path:
        return self.paths.metrics(self.name, self.item)

    @property
    def plots(self) -> Path:
        """The stage's plots folder (`plots/<stage>/`); an item's plots are files named after it there."""
        return self.paths.plots(self.name)

    def add_input(self, path: Path) -> None:
        """Record an input's md5 (file, or folder listing) under its path relative to the root."""
        path = Path(path)
        root = self.paths.root
        try:
            key = path.resolve().relative_to(Path(root).resolve()).as_posix()
        except ValueError:
            key = str(path)
        self.inputs[key] = md5_path(path)

    def accelerator(self, **kwargs):
        """An `accelerate.Accelerator` for this stage's training; the manifest records its device."""
        from accelerate import Accelerator

        accelerator = Accelerator(**kwargs)
        self.device = str(accelerator.device)
        return accelerator

    def manifest(self, artifact: str, **extra: Any) -> dict:
        volatile = set(extra) & set(RUN_FIELDS)
        if volatile:
            raise ValueError(f"manifest extras {sorted(volatile)} change on every run; put them in the "
                             "metrics file instead")
        return {"stage": self.name, "artifact": artifact, "inputs": self.inputs, "params": self.params,
                "seed": self.seed, "device": self.device, "libraries": library_versions(), **extra}

    @contextmanager
    def output(self, artifact: str, **extra: Any) -> Iterator[Path]:
        """An empty temporary folder that becomes the stage's output folder, with its manifest, only
        if the block succeeds; on failure nothing is left behind."""
        with atomic_dir(self.output_dir) as tmp:
            yield tmp
            write_json(tmp / MANIFEST_FILE, self.manifest(artifact, **extra))

    def run_record(self) -> dict:
        """What differs between reruns on the same inputs: the commit, the wall time so far, and the
        machine and libraries (so two runs on different machines that differ say why)."""
        return {"git_revision": git_revision(self.paths.root),
                "wall_time_s": round(time.perf_counter() - self.started, 3),
                "machine": machine(), "libraries": library_versions()}

    def finish(self, metrics: dict) -> dict:
        """Write the metrics file (with the run record under "run") and return the metrics."""
        metrics["run"] = self.run_record()
        write_json(self.metrics_file, metrics)
        return metrics


SHOWN = 40


def stage_main(stage: str, run: Callable[..., dict], items: str | None = None, whole: bool = False) -> None:
    """Run a stage on its `params.yaml` section, from the project root (as `dvc repro` runs it).

    The whole file is validated first, so a typo anywhere fails before any work. A foreach stage
    (`distill_data@bold`) names its `items` field; the item comes as the one command-line argument.
    With `whole`, the stage gets all of params (a compression stage reads `deliverables` beside its
    own section) and `items` names a top-level field.
    """
    try:
        params = load_params(Path("params.yaml"))
        cfg: Section = params if whole else getattr(params, stage)
        args = [StagePaths(Path.cwd())]
        if items:
            known = getattr(cfg, items)
            if len(sys.argv) != 2 or sys.argv[1] not in known:
                given = sys.argv[1] if len(sys.argv) > 1 else "nothing"
                where = items if whole else f"{stage}.{items}"
                raise StageError(f"usage: python -m tasks.{stage} ITEM, where ITEM is one of "
                                 f"{where} in params.yaml ({', '.join(known)}); got {given}")
            args.append(sys.argv[1])
        metrics = run(cfg, *args)
    except (ConfigError, StageError, DataError, FileNotFoundError) as err:
        print(f"{stage} failed: {err}", file=sys.stderr)
        sys.exit(INPUT_ERROR)
    flat = list(_flat(metrics).items())
    # The headline figures; a compression stage's per-layer tables stay in its metrics file.
    shown = ", ".join(f"{k}={v}" for k, v in flat[:SHOWN])
    more = f", ... ({len(flat) - SHOWN} more in {Path('metrics') / stage})" if len(flat) > SHOWN else ""
    print(f"{stage} done: {shown}{more}")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if k == "run" and not prefix:
            continue
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, float):
            out[f"{prefix}{k}"] = round(v, 4)
        elif not isinstance(v, (list, str)):
            out[f"{prefix}{k}"] = v
    return out
