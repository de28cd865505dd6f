"""`condenser serve`: one machine runs the pipeline on a schedule and on commits.

It starts what is missing and stops what it started:

1. a Prefect server on 127.0.0.1 (`prefect server start`; the ephemeral server `condenser run` uses cannot
   hold schedules or triggers), unless PREFECT_API_URL names one that answers: then it registers there;
2. the process work pool `condenser`;
3. the deployment in `prefect.yaml` (`prefect --no-prompt deploy --all`, with CONDENSER_ROOT set to this
   checkout): a nightly cron schedule and a trigger on `git.commit` events for this checkout;
4. a worker on the pool, which runs each flow run as a process in this checkout.

Ctrl-C (or SIGTERM) stops the worker, then the server, each given time to finish cleanly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from threading import Thread

POOL = "condenser"
FLOW = "condenser-pipeline"
DEPLOYMENT = "pipeline"
HOST, PORT = "127.0.0.1", 4200
STARTUP_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 20.0
# How often the worker asks for due runs (Prefect's default is 10 s): part of the commit-to-run latency.
WORKER_POLL_S = 2
# What stage processes need wherever the worker runs them (the Makefile exports the same).
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "GX_ANALYTICS_ENABLED": "false",
               "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


class ServeError(RuntimeError):
    """A service did not start; the message holds what it printed and what to do."""


def healthy(api_url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout_s) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


def free_port(host: str = HOST) -> int:
    """A port nothing listens on now (the OS picks it)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def prefect_cli() -> list[str]:
    return [sys.executable, "-m", "prefect"]


@dataclass
class Process:
    """A service this command started: its output is kept (the tail goes into errors) and echoed if asked."""

    name: str
    popen: subprocess.Popen
    tail: deque = field(default_factory=lambda: deque(maxlen=60))

    @classmethod
    def start(cls, name: str, cmd: list[str], env: dict, cwd: Path, echo) -> Process:
        popen = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, bufsize=1, preexec_fn=_die_with_parent)
        proc = cls(name, popen)
        Thread(target=proc._pump, args=(echo,), daemon=True).start()
        return proc

    def _pump(self, echo) -> None:
        for line in self.popen.stdout:
            self.tail.append(line.rstrip())
            if echo:
                echo(f"[{self.name}] {line.rstrip()}")

    def output(self) -> str:
        return "\n".join(self.tail)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGINT (what Ctrl-C sends; both Prefect services shut down cleanly on it), SIGKILL if it hangs."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when `condenser serve` dies, even by SIGKILL, so no server or worker
    outlives it (Linux; elsewhere the services stop only with a clean exit)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


@dataclass
class Services:
    api_url: str
    ui_url: str
    root: Path
    started: list[Process] = field(default_factory=list)
    deployment: dict = field(default_factory=dict)

    def stop(self) -> None:
        # The worker first: it must not pick up a run from a server that is going away.
        for proc in reversed(self.started):
            proc.stop()
        self.started.clear()


def start_server(host: str, port: int, env: dict, root: Path, echo=None,
                 options: tuple[str, ...] = ()) -> tuple[Process, str]:
    """`prefect server start` on host:port (plus `options`, e.g. `--no-services --no-ui` for a server that only
    records runs); waits until its API answers, or fails with its output."""
    api_url = f"http://{host}:{port}/api"
    if healthy(api_url):
        raise ServeError(f"something already answers at {api_url}; to register with it set "
                         f"PREFECT_API_URL={api_url}, or pick another --port")
    proc = Process.start("server", [*prefect_cli(), "server", "start", "--host", host, "--port", str(port), *options],
                         {**env, "PREFECT_UI_API_URL": api_url}, root, echo)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not healthy(api_url):
        if proc.popen.poll() is not None or time.monotonic() > deadline:
            proc.stop()
            raise ServeError(f"the Prefect server did not start on {host}:{port}:\n{proc.output()}")
        time.sleep(0.5)
    return proc, api_url


def run_cli(args: list[str], env: dict, root: Path, what: str) -> str:
    done = subprocess.run([*prefect_cli(), *args], cwd=root, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise ServeError(f"{what} failed (`prefect {' '.join(args)}`, exit {done.returncode}):\n"
                         f"{(done.stdout + done.stderr)[-3000:]}")
    return done.stdout


def deploy(root: Path, env: dict) -> None:
    """The work pool (if missing) and the deployments of `prefect.yaml`, for this checkout."""
    if not (root / "prefect.yaml").is_file():
        raise ServeError(f"{root / 'prefect.yaml'}: missing; run `condenser serve` in a Condenser checkout "
                         "(--root names it)")
    found = subprocess.run([*prefect_cli(), "work-pool", "inspect", POOL], cwd=root, env=env, capture_output=True)
    if found.returncode != 0:
        run_cli(["work-pool", "create", POOL, "--type", "process"], env, root, f"creating work pool {POOL}")
    done = subprocess.run([*prefect_cli(), "--no-prompt", "deploy", "--all"], cwd=root, env=env,
                          capture_output=True, text=True)
    output = done.stdout + done.stderr
    # Prefect 3.8.8's `prefect deploy` saves the deployment, its schedules and triggers, then asks its own
    # server which workers are online with `limit: null`, which that server rejects (422): the deployment
    # is in place, only that closing hint fails. Anything else is a real failure.
    known = "workers/filter" in output and "422" in output
    if done.returncode != 0 and not known:
        raise ServeError(f"deploying prefect.yaml failed (`prefect --no-prompt deploy --all`, exit "
                         f"{done.returncode}):\n{output[-3000:]}")


def deployment_info(api_url: str) -> dict:
    """The registered deployment: schedules (cron, timezone, next run) and its event triggers."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.server.schemas.schedules import CronSchedule
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def read() -> dict:
        async with get_client() as client:
            deployment = await client.read_deployment_by_name(f"{FLOW}/{DEPLOYMENT}")
            schedules = []
            for s in deployment.schedules:
                cron = getattr(s.schedule, "cron", None)
                # The server's own schedule model computes the dates its scheduler will create runs for.
                dates = await CronSchedule(cron=cron, timezone=s.schedule.timezone).get_dates(1) if cron else []
                schedules.append({"cron": cron, "timezone": getattr(s.schedule, "timezone", None),
                                  "active": s.active, "next": dates[0].isoformat() if dates else None})
            return {"id": str(deployment.id), "name": f"{FLOW}/{DEPLOYMENT}", "schedules": schedules,
                    "work_pool": deployment.work_pool_name}

    with temporary_settings({PREFECT_API_URL: api_url}):
        return asyncio.run(read())


@contextmanager
def serve(root: Path, host: str = HOST, port: int = PORT, worker: bool = True, echo=None) -> Iterator[Services]:
    """Everything `condenser serve` runs, up until the block ends; the services it started stop then."""
    root = Path(root).resolve()
    env = {**os.environ, **OFFLINE_ENV, "CONDENSER_ROOT": str(root),
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    external = os.environ.get("PREFECT_API_URL", "").rstrip("/")
    if external and not healthy(external):
        raise ServeError(f"PREFECT_API_URL={external} does not answer; start that server, or unset "
                         "PREFECT_API_URL to let `condenser serve` start one on 127.0.0.1")
    services = Services(api_url=external, ui_url=external.removesuffix("/api"), root=root)
    try:
        if not external:
            server, services.api_url = start_server(host, port, env, root, echo)
            services.started.append(server)
            services.ui_url = services.api_url.removesuffix("/api")
        env["PREFECT_API_URL"] = services.api_url
        deploy(root, env)
        services.deployment = deployment_info(services.api_url)
        if worker:
            services.started.append(Process.start(
                "worker", [*prefect_cli(), "worker", "start", "--pool", POOL, "--type", "process"],
                {**env, "PREFECT_WORKER_QUERY_SECONDS": str(WORKER_POLL_S)}, root, echo))
        yield services
    finally:
        services.stop()


def wait_for_signal(services: Services) -> None:
    """Block until Ctrl-C or SIGTERM; a service that dies meanwhile ends the wait with its output."""
    stop = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.append(True))
    while not stop:
        for proc in services.started:
            if proc.popen.poll() is not None:
                raise ServeError(f"the {proc.name} exited ({proc.popen.returncode}):\n{proc.output()}")
        time.sleep(0.2)
