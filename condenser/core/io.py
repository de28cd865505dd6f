"""Stage files: where they live, atomic folders and JSON, content hashes.

A stage writes into a temporary sibling folder and renames it into place at the end, so a failed
stage leaves no partial output (docs/architecture.md, "The stage contract").
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any


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


def remove_stale_temps(final: Path) -> list[Path]:
    """Remove the temporary siblings of `final` that a killed run left (SIGKILL, OOM, power loss: no
    `except` ran). A temp is named after the pid that wrote it; one whose process is gone is stale.
    `.dvcignore` and `.gitignore` hide these names meanwhile, so a leftover never changes a dep's hash."""
    removed = []
    for old in Path(final).parent.glob(f".{glob.escape(Path(final).name)}.tmp-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _running(int(pid)):
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
            removed.append(old)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        # Another user's process holds that pid now: not ours to judge, keep the folder.
        return True
    return True


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary folder that replaces `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final)
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
    remove_stale_temps(path)
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
