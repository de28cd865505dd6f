"""Reliability of a real run: no network, and a run killed with SIGKILL mid-stage leaves nothing partial.

One tiny project (dvc.yaml keeps prepare and evaluator) serves both, run through `condenser run` against a
Prefect server on 127.0.0.1 that the test starts (one server start instead of one per run):

- No network: every Python process of a run (the flow, the server, `dvc repro`, the stages, and any child they
  start, DVC's detached daemon included, which swaps PYTHONPATH for its own) starts with a `sitecustomize` that
  refuses connections beyond loopback and name lookups other than localhost, and logs each start and refusal.
  HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE and GX_ANALYTICS_ENABLED are unset for the runs: the code is offline by
  itself. DVC's own analytics are off as in the project's committed `.dvc/config` (scratch_project sets it).
- SIGKILL of the whole run (flow, `dvc repro`, stage) while the evaluator trains: DVC removed the stage's
  outputs before running it, so they are absent, never half written; dvc.lock still records the last complete
  run; a stale `data/.evaluator.tmp-<pid>` sibling (what a kill during the stage's final rename leaves) is
  invisible to `dvc status` and `git status`; the next run completes, removes that temp, and reproduces the
  first run's output md5 exactly. Until the killed `dvc repro` is reaped (a zombie: about 2 s on the dev machine,
  for ever under a parent that never reaps orphans, such as a container whose pid 1 is a Python worker), DVC's
  rwlock blocks every DVC command on the stage's paths, the next run's included: the test holds the zombies to
  show that, then reaps them before the next run.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import tiny_params

from bench.pipeline import dvc, scratch_project, stage_env
from condenser.core.io import md5_path
from condenser.lineage import read_lock
from flows.serve import free_port, start_server

STAGES = ["prepare", "evaluator"]
# Seconds of training on 2 cores: long enough to kill the stage mid-training, short enough to run it twice.
EPOCHS = 20
REFUSED = "refused by the no-network guard"
# Linux prctl option: orphans of our descendants become our children, so the test decides when they are reaped.
PR_SET_CHILD_SUBREAPER = 36

GUARD = '''"""No-network guard (tests/test_reliability.py): this process connects only to loopback and Unix sockets,
looks up no name but localhost, and logs its start and every refusal to CONDENSER_NET_LOG."""

import errno
import ipaddress
import os
import socket
import subprocess
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
LOG = os.environ.get("CONDENSER_NET_LOG", "")
REFUSED = "refused by the no-network guard"


def _note(line):
    if LOG:
        with open(LOG, "a") as log:
            log.write(f"{os.getpid()} {line}\\n")


def _ip(host):
    try:
        return ipaddress.ip_address(str(host).split("%", 1)[0])
    except ValueError:
        return None


def _remote(sock, address):
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    ip = _ip(address[0])
    mapped = getattr(ip, "ipv4_mapped", None)
    return not (ip is not None and (ip.is_loopback or (mapped is not None and mapped.is_loopback)))


def _refuse(what):
    stack = " | ".join(" ".join(f.split()) for f in traceback.format_stack(limit=12)[:-2])
    _note(f"refused {what!r} in {' '.join(sys.orig_argv)!r}: {stack}")
    return f"{REFUSED}: {what!r}"


_connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo
_popen_init = subprocess.Popen.__init__


def connect(self, address):
    if _remote(self, address):
        raise OSError(errno.ENETUNREACH, _refuse(address))
    return _connect(self, address)


def connect_ex(self, address):
    if _remote(self, address):
        _refuse(address)
        return errno.ENETUNREACH
    return _connect_ex(self, address)


def getaddrinfo(host, *args, **kwargs):
    # A name would be asked of a DNS server; an address needs no lookup (connect judges it).
    name = host.decode() if isinstance(host, bytes) else host
    if name not in (None, "", "localhost") and _ip(name) is None:
        raise socket.gaierror(socket.EAI_NONAME, _refuse(name))
    return _getaddrinfo(host, *args, **kwargs)


def popen_init(self, *args, **kwargs):
    # A child given an environment of its own keeps the guard (DVC's daemon gets DVC's PYTHONPATH only).
    env = kwargs.get("env")
    if env is not None and HERE not in env.get("PYTHONPATH", "").split(os.pathsep):
        paths = [HERE] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        kwargs["env"] = {**env, "PYTHONPATH": os.pathsep.join(paths), "CONDENSER_NET_LOG": LOG}
    return _popen_init(self, *args, **kwargs)


socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo
subprocess.Popen.__init__ = popen_init
_note("start " + " ".join(" ".join(sys.orig_argv).split()))
'''


def guarded_env(tmp_path: Path) -> dict[str, str]:
    """stage_env() with the guard first on PYTHONPATH, a private Prefect home, and no offline switches."""
    guard = tmp_path / "netguard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(GUARD)
    env = {**stage_env(), "PYTHONPATH": os.pathsep.join(filter(None, [str(guard), os.environ.get("PYTHONPATH")])),
           "CONDENSER_NET_LOG": str(tmp_path / "net.log"), "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
           "OMP_NUM_THREADS": "1"}
    # conftest sets these for in-process stage tests; a run must need none of them.
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "GX_ANALYTICS_ENABLED", "PREFECT_API_URL"):
        env.pop(name, None)
    return env


def net_log(tmp_path: Path) -> tuple[list[str], list[str]]:
    """The guard's log: the command lines of the processes it started in, and its refusals."""
    lines = (tmp_path / "net.log").read_text().splitlines() if (tmp_path / "net.log").is_file() else []
    starts = [line.split(" start ", 1)[1] for line in lines if " start " in line]
    return starts, [line for line in lines if " refused " in line]


def run_cmd(root: Path) -> list[str]:
    return [sys.executable, "-m", "condenser.cli", "run", "evaluator", "--root", str(root)]


def condenser_run(root: Path, env: dict[str, str]) -> str:
    done = subprocess.run(run_cmd(root), cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout + done.stderr


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout


def temps(root: Path) -> list[str]:
    """Temporary siblings (`.<out>.tmp-<pid>`) anywhere under the outputs' folders."""
    return sorted(p.relative_to(root).as_posix() for d in ("data", "metrics", "plots") for p in
                  (root / d).rglob(".*.tmp-*"))


def set_subreaper(on: bool) -> None:
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def reap(pids, timeout_s: float = 30) -> set[int]:
    """Reap the killed processes, which became this process's children as their parents died; returns those
    that could not be reaped."""
    waiting, deadline = set(pids), time.monotonic() + timeout_s
    while waiting and time.monotonic() < deadline:
        for pid in list(waiting):
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    waiting.discard(pid)
            except ChildProcessError:
                # Not ours yet (its parent is still dying), or already gone.
                if not psutil.pid_exists(pid):
                    waiting.discard(pid)
        time.sleep(0.05)
    return waiting


def kill_mid_training(root: Path, env: dict[str, str], killed: dict[str, int]) -> str:
    """Start a run in its own process group and SIGKILL the group once the evaluator reports training; returns
    the output. `killed` gets the pids of the run's processes by command line, `dvc` and `stage` among them."""
    run = subprocess.Popen(run_cmd(root), cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, start_new_session=True)
    output = []
    for line in run.stdout:
        output.append(line)
        if "evaluator: training judge" in line:
            break
    else:
        raise AssertionError(f"the run ended before the evaluator trained:\n{''.join(output)[-4000:]}")
    for child in psutil.Process(run.pid).children(recursive=True):
        try:
            cmdline = child.cmdline()
        except psutil.Error:
            continue
        if "dvc" in " ".join(cmdline) and "repro" in cmdline:
            killed["dvc"] = child.pid
        elif "tasks.evaluator" in cmdline and "python" in cmdline[0]:
            killed["stage"] = child.pid
        else:
            killed[" ".join(cmdline)] = child.pid
    os.killpg(run.pid, signal.SIGKILL)
    output.append(run.stdout.read())
    assert run.wait() == -signal.SIGKILL
    assert {"dvc", "stage"} <= set(killed), f"no dvc repro or stage process under the run: {killed}"
    return "".join(output)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_offline_run_and_a_sigkill_mid_stage_leave_nothing_partial(tmp_path):
    params = tiny_params()
    params["evaluator"]["epochs"] = EPOCHS
    root = scratch_project(tmp_path / "project", params, stages=STAGES)
    env = guarded_env(tmp_path)
    # A server that only records runs: no UI, no background services (the runs need neither).
    server, env["PREFECT_API_URL"] = start_server("127.0.0.1", free_port(), env, root,
                                                  options=("--no-services", "--no-ui"))
    try:
        # The guard refuses what leaves the machine, in any process that has it, and logs the refusal.
        connect = "import socket; socket.create_connection(('10.255.255.1', 80), 5)"
        probe = subprocess.run([sys.executable, "-c", connect], env=env, capture_output=True, text=True, timeout=60)
        assert probe.returncode != 0 and f"{REFUSED}: ('10.255.255.1', 80)" in probe.stderr, probe.stderr

        # 1. A clean run, offline: the flow, its server, dvc and both stages ran with the guard; nothing was refused
        #    but the probe.
        condenser_run(root, env)
        starts, refused = net_log(tmp_path)
        for expected in ("prefect server start", "condenser.cli run evaluator", "dvc repro --single-item prepare",
                         "-m tasks.prepare", "dvc repro --single-item evaluator", "-m tasks.evaluator"):
            assert any(expected in s for s in starts), f"no guarded process ran {expected!r}: {starts}"
        assert len(refused) == 1 and "10.255.255.1" in refused[0], "\n".join(refused)
        git(root, "add", "-A")
        git(root, "commit", "-q", "-m", "run 1")
        lock_1, records_1 = (root / "dvc.lock").read_bytes(), read_lock(root)
        judge_1 = md5_path(root / "data" / "evaluator")

        # 2. A code change that leaves the computation as it was: the evaluator reruns (no run-cache entry for the
        #    new code), and must reproduce run 1's output. Killed mid-training, with the whole run.
        with (root / "tasks" / "evaluator.py").open("a") as f:
            f.write("# A comment: the evaluator's code changed, its output must not.\n")
        pids: dict[str, int] = {}
        # The killed processes become this process's zombies until `reap`: deterministic, and what a parent that
        # never reaps orphans (a container's pid 1) leaves for ever.
        set_subreaper(True)
        try:
            output = kill_mid_training(root, env, pids)
            assert "evaluator done" not in output, "the evaluator finished before the kill: raise EPOCHS"
            # Nothing partial: DVC removed the stage's outputs before running it (they stay in its cache, and
            # dvc.lock names them), and the stage never wrote them.
            for out in ("data/evaluator", "metrics/evaluator.json"):
                assert not (root / out).exists(), f"{out} left behind by the killed run"
            assert temps(root) == [], "the stage was killed before writing; it left no temp"
            assert (root / "dvc.lock").read_bytes() == lock_1, "dvc.lock changed by the killed run"
            # What a kill during the stage's final save leaves: its temp sibling, named after its (dead) pid.
            stale = root / "data" / f".evaluator.tmp-{pids['stage']}"
            stale.mkdir()
            (stale / "judge.safetensors").write_bytes(b"\0" * 100)

            # DVC's rwlock still names the killed `dvc repro`; while that pid exists (a zombie) DVC refuses.
            blocked = subprocess.run([*dvc(), "status"], cwd=root, env=env, capture_output=True, text=True)
            message = blocked.stdout + blocked.stderr
            assert blocked.returncode != 0, message
            assert "is busy, it is being blocked by" in message and f"(PID {pids['dvc']})" in message, message
        finally:
            unreaped = reap(pids.values())
            set_subreaper(False)
        assert not unreaped, f"killed processes not reaped: {unreaped}"

        # Reaped, the killed process is gone: DVC drops its rwlock entries with a warning and answers.
        status = subprocess.run([*dvc(), "status", "--json"], cwd=root, env=env, capture_output=True, text=True)
        assert status.returncode == 0, status.stdout + status.stderr
        assert f"(Pid {pids['dvc']})" in status.stderr and "had been killed. Auto removed it" in status.stderr
        assert json.loads(status.stdout.strip().splitlines()[-1]) == {"evaluator": [
            {"changed deps": {"tasks/evaluator.py": "modified"}},
            {"changed outs": {"data/evaluator": "deleted", "metrics/evaluator.json": "deleted"}}]}
        # The stale temp is in no listing and no hash: .dvcignore and .gitignore hide `.*.tmp-*`.
        assert git(root, "status", "--porcelain", "--untracked-files=all").splitlines() == [
            " D metrics/evaluator.json", " M tasks/evaluator.py"]
        ignored = subprocess.run([*dvc(), "check-ignore", "-d", stale.relative_to(root).as_posix()], cwd=root,
                                 env=env, capture_output=True, text=True)
        assert ignored.returncode == 0 and ignored.stdout.startswith(".dvcignore:"), ignored.stdout + ignored.stderr

        # 3. The next run completes, removes the stale temp, and reproduces run 1 exactly.
        condenser_run(root, env)
        assert temps(root) == []
        assert md5_path(root / "data" / "evaluator") == judge_1
        records_3 = read_lock(root)
        assert records_3["evaluator"].outs["data/evaluator"] == records_1["evaluator"].outs["data/evaluator"]
        assert records_3["prepare"] == records_1["prepare"]
        # Three runs, one kill: still nothing refused but the probe.
        refused = net_log(tmp_path)[1]
        assert len(refused) == 1, "\n".join(refused)
    finally:
        server.stop()
