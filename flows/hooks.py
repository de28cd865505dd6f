"""The git post-commit hook: tell the Prefect server that a commit changed the pipeline's inputs.

`condenser hooks install` writes `.git/hooks/post-commit`. After each commit it runs
`python -m flows.hooks post-commit` in the background (the commit never waits for it and never fails
because of it) which:

1. lists the files the commit changed (`git diff-tree`);
2. keeps those that are pipeline inputs: `params.yaml`, `dvc.yaml`, code under `condenser/`, `tasks/`,
   `flows/`, DVC-tracked data (`*.dvc` files) and any other path a stage in `dvc.yaml` lists as a dep;
3. if any, POSTs one `git.commit` event (resource `condenser.repo.<checkout>`, payload: sha, branch,
   the changed inputs) to the server's events endpoint; with no server up it logs that and stops.

The deployment's trigger in `prefect.yaml` matches that resource and passes sha and branch to the flow.
Every outcome is logged to `.git/condenser-hook.log`. Only the standard library and PyYAML: a hook must
start fast, and importing Prefect takes seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from datetime import datetime, timezone
from pathlib import Path

import yaml

EVENT = "git.commit"
RESOURCE_PREFIX = "condenser.repo."
DEFAULT_API_URL = "http://127.0.0.1:4200/api"
# Where the hook finds the server when PREFECT_API_URL is not set in the committing shell.
API_URL_CONFIG = "condenser.prefect-api-url"
CODE_DIRS = ("condenser/", "tasks/", "flows/")
INPUT_FILES = ("params.yaml", "dvc.yaml")
MARK_BEGIN, MARK_END = "# >>> condenser post-commit >>>", "# <<< condenser post-commit <<<"
LOG_FILE = "condenser-hook.log"
TIMEOUT_S = 5.0


class HookError(RuntimeError):
    """The hook cannot be installed; the message says why and what to do."""


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()


def repository(start: Path) -> Path:
    """The top of the git checkout holding `start`, resolved (the deployment's trigger matches this path)."""
    try:
        return Path(git(Path(start), "rev-parse", "--show-toplevel")).resolve()
    except (OSError, subprocess.CalledProcessError):
        raise HookError(f"{start}: not inside a git repository; run this in your Condenser checkout") from None


def resource_id(root: Path) -> str:
    return RESOURCE_PREFIX + str(Path(root).resolve())


def changed_files(root: Path, sha: str) -> list[str]:
    """Paths the commit added, modified or deleted (against its first parent; everything for a root commit)."""
    return git(root, "diff-tree", "--no-commit-id", "--name-only", "-r", "--root", sha).splitlines()


def stage_deps(root: Path) -> set[str]:
    """Every dep path `dvc.yaml` lists (foreach templates skipped: those name stage outputs, not inputs)."""
    path = root / "dvc.yaml"
    try:
        stages = (yaml.safe_load(path.read_text()) or {}).get("stages") or {}
    except (OSError, yaml.YAMLError):
        return set()
    deps = set()
    for stage in stages.values():
        body = stage.get("do", stage) if isinstance(stage, dict) else {}
        for dep in body.get("deps") or []:
            if isinstance(dep, str) and "${" not in dep:
                deps.add(dep.rstrip("/"))
    return deps


def pipeline_inputs(root: Path, files: list[str]) -> list[str]:
    """The files among `files` that can change what the pipeline computes."""
    deps = stage_deps(root)

    def is_input(path: str) -> bool:
        return (path in INPUT_FILES or path.endswith(".dvc") or path.startswith(CODE_DIRS)
                or any(path == dep or path.startswith(dep + "/") for dep in deps))

    return [f for f in files if is_input(f)]


def commit_event(root: Path, sha: str | None = None, branch: str | None = None) -> dict | None:
    """The `git.commit` event for `sha` on `branch` (default HEAD and its branch), or None when the commit
    changed no pipeline input."""
    sha = git(root, "rev-parse", sha or "HEAD")
    inputs = pipeline_inputs(root, changed_files(root, sha))
    if not inputs:
        return None
    branch = branch if branch is not None else git(root, "rev-parse", "--abbrev-ref", "HEAD")
    return {
        "id": str(uuid.uuid4()),
        "occurred": datetime.now(timezone.utc).isoformat(),
        "event": EVENT,
        "resource": {"prefect.resource.id": resource_id(root), "prefect.resource.name": root.name},
        "payload": {"sha": sha, "branch": "" if branch == "HEAD" else branch, "changed": inputs,
                    "subject": git(root, "log", "-1", "--format=%s", sha), "repository": str(root)},
    }


def api_url(root: Path) -> str:
    """PREFECT_API_URL if the committing shell has it, else the one `hooks install` recorded, else the default
    `condenser serve` uses."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"].rstrip("/")
    try:
        return git(root, "config", "--get", API_URL_CONFIG).rstrip("/") or DEFAULT_API_URL
    except subprocess.CalledProcessError:
        return DEFAULT_API_URL


def emit(url: str, event: dict, timeout_s: float = TIMEOUT_S) -> None:
    """POST the event to the server's events endpoint (what Prefect's own client sends, without Prefect)."""
    request = urllib.request.Request(f"{url}/events", data=json.dumps([event]).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        if response.status >= 300:
            raise urllib.error.HTTPError(request.full_url, response.status, response.reason, response.headers, None)


def post_commit(root: Path, sha: str, branch: str) -> str:
    """What the hook does after the commit `sha` on `branch`; returns the line it logs. Never raises for a
    missing server."""
    event = commit_event(root, sha, branch)
    sha = sha[:12]
    if event is None:
        return f"{sha}: no pipeline input changed; no event"
    url = api_url(root)
    try:
        emit(url, event)
    except (OSError, urllib.error.URLError) as err:
        return (f"{sha}: pipeline inputs changed ({', '.join(event['payload']['changed'][:5])}) but no Prefect "
                f"server answered at {url} ({err}); start one with `condenser serve`, then run the pipeline by "
                "hand (`condenser run`) or commit again")
    return f"{sha}: {EVENT} sent to {url} for {', '.join(event['payload']['changed'][:5])}"


def hook_script(python: str) -> str:
    # Backgrounded and detached, output to the log: the commit returns at once whatever the server does.
    return "\n".join([
        MARK_BEGIN,
        "# Emits a git.commit event to Prefect when this commit changed pipeline inputs (flows/hooks.py).",
        "# Runs in the background; never blocks or fails the commit. Remove with: condenser hooks uninstall",
        'top="$(git rev-parse --show-toplevel)"; gitdir="$(git rev-parse --absolute-git-dir)"',
        "# The commit's sha and branch now: the background job may start after the next commit.",
        'sha="$(git rev-parse HEAD)"; branch="$(git rev-parse --abbrev-ref HEAD)"',
        f'(cd "$top" && nohup "{python}" -m flows.hooks post-commit "$sha" "$branch" >> "$gitdir/{LOG_FILE}" '
        "2>&1 &) >/dev/null 2>&1 || true",
        MARK_END, ""])


def install(root: Path, url: str | None = None, python: str = sys.executable) -> Path:
    """Write (or update) the post-commit hook of `root`'s repository; an existing hook of another tool keeps
    its lines, ours go between markers. `url` is recorded for shells without PREFECT_API_URL."""
    root = repository(root)
    hooks = Path(git(root, "rev-parse", "--git-path", "hooks"))
    hooks = hooks if hooks.is_absolute() else root / hooks
    hooks.mkdir(parents=True, exist_ok=True)
    hook = hooks / "post-commit"
    existing = hook.read_text() if hook.is_file() else "#!/bin/sh\n"
    kept = _without_block(existing)
    if not kept.startswith("#!"):
        raise HookError(f"{hook}: exists but is not a shell script (no #! line); add this to it by hand:\n"
                        + hook_script(python))
    hook.write_text(kept.rstrip("\n") + "\n" + hook_script(python))
    hook.chmod(0o755)
    if url:
        git(root, "config", API_URL_CONFIG, url.rstrip("/"))
    return hook


def uninstall(root: Path) -> Path | None:
    root = repository(root)
    hook = root / git(root, "rev-parse", "--git-path", "hooks") / "post-commit"
    if not hook.is_file():
        return None
    kept = _without_block(hook.read_text())
    if kept.strip() in ("", "#!/bin/sh"):
        hook.unlink()
    else:
        hook.write_text(kept)
    return hook


def _without_block(text: str) -> str:
    if MARK_BEGIN not in text:
        return text
    before, rest = text.split(MARK_BEGIN, 1)
    after = rest.split(MARK_END, 1)[1] if MARK_END in rest else ""
    return before + after.lstrip("\n")


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] != "post-commit":
        print("usage: python -m flows.hooks post-commit SHA BRANCH", file=sys.stderr)
        return 2
    _, sha, branch = argv
    try:
        line = post_commit(repository(Path.cwd()), sha, "" if branch == "HEAD" else branch)
    except Exception as err:  # noqa: BLE001 -- a hook must never break a commit; the log says what failed
        line = f"condenser hook failed: {type(err).__name__}: {err}"
    print(f"{datetime.now().isoformat(timespec='seconds')} {line}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
