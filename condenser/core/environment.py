"""What a run ran on: the commit, the machine and the library versions.

Reruns on one machine are bit-identical, but a run on another machine may differ in the last digits
(another CPU's kernels, another thread count, another library release). Every stage records this in
its metrics file's run record, so two runs that differ say why.
"""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

LIBRARIES = ("condenser", "torch", "diffusers", "transformers", "accelerate", "peft", "numpy",
             "scikit-learn", "great-expectations", "safetensors")


# What the pipeline itself writes into tracked files: a run in progress changes them, which says nothing
# about the code and params the run used.
PIPELINE_RECORDS = ("dvc.lock", "metrics", "plots")


def git_revision(root: Path) -> str:
    """HEAD's sha, with '-dirty' when tracked code or params differ from it; 'unknown' outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        excluded = [f":(exclude){p}" for p in PIPELINE_RECORDS]
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *excluded],
                               cwd=root, capture_output=True, text=True, check=True).stdout.strip()
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


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """The hardware and thread settings numerical results can depend on."""
    import torch

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "platform": platform.platform()}
