"""Stage outputs: atomic folders, manifests, metrics files and content hashes.

A stage writes into a temporary sibling folder and renames it into place at the end, so a failed
stage leaves no partial output (DESIGN.md, "The stage contract").
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

# Fields of Manifest.run_record(): never in manifest.json, which must not change between reruns.
RUN_FIELDS = ("git_revision", "wall_time_s")

LIBRARIES = ("condenser", "torch", "diffusers", "transformers", "accelerate", "peft", "numpy",
             "scikit-learn", "great-expectations", "safetensors")


@dataclass(frozen=True)
class StagePaths:
    """Where a stage reads and writes, relative to a project root (the repo, or a test's tmp_path)."""

    root: Path

    # A foreach stage (`distill_data@bold`) writes one item folder: data/distill_data/bold/.
    def data(self, stage: str, item: str | None = None) -> Path:
        return self.root / "data" / stage / (item or "")

    def metrics(self, stage: str, item: str | None = None) -> Path:
        if item:
            return self.root / "metrics" / stage / f"{item}.json"
        return self.root / "metrics" / f"{stage}.json"

    def plots(self, stage: str, item: str | None = None) -> Path:
        return self.root / "plots" / stage / (item or "")


def md5_file(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def md5_path(path: Path) -> str:
    """md5 of a file, or of a folder's sorted (relative path, file md5) listing."""
    path = Path(path)
    if path.is_file():
        return md5_file(path)
    h = hashlib.md5()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path).as_posix()}\t{md5_file(f)}\n".encode())
    return h.hexdigest()


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary folder that replaces `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final) if final.is_dir() else final.unlink()
    tmp.rename(final)


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename), keys sorted so reruns give the same bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n")
    os.replace(tmp, path)


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return obj.as_posix()
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def git_revision(root: Path) -> str:
    """HEAD's sha, with '-dirty' when tracked files differ; 'unknown' outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


class Manifest:
    """Collects what a stage's artifact is and what made it; written as `manifest.json`.

    The manifest lies inside a DVC-hashed output, so it holds only what the inputs, params and code
    determine: a rerun on the same ones gives the same bytes, and DVC reruns nothing downstream. The
    volatile part (commit, wall time) is `run_record()`, which stages put in their metrics file.
    """

    def __init__(self, stage: str, root: Path, params: dict, seed: int | None = None):
        self.stage, self.root, self.params, self.seed = stage, Path(root), params, seed
        self.inputs: dict[str, str] = {}
        self.started = time.perf_counter()

    def add_input(self, path: Path) -> None:
        path = Path(path)
        try:
            key = path.resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            key = str(path)
        self.inputs[key] = md5_path(path)

    def write(self, out_dir: Path, artifact: str, device: str = "cpu", **extra: Any) -> dict:
        manifest = {
            "stage": self.stage,
            "artifact": artifact,
            "inputs": self.inputs,
            "params": self.params,
            "seed": self.seed,
            "device": device,
            "libraries": library_versions(),
            **extra,
        }
        volatile = set(manifest) & set(RUN_FIELDS)
        if volatile:
            raise ValueError(f"manifest extras {sorted(volatile)} change on every run; put them in the "
                             "metrics file (run_record()) instead")
        write_json(Path(out_dir) / "manifest.json", manifest)
        return manifest

    def run_record(self) -> dict:
        """What differs between reruns on the same inputs: the commit and the wall time so far."""
        return {"git_revision": git_revision(self.root),
                "wall_time_s": round(time.perf_counter() - self.started, 3)}
