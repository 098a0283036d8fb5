"""Fixtures of the reliability suite: the release binary under load, overload, hostile clients,
restarts behind HAProxy and nginx, model reloads, and the decode path under cargo fuzz.

Each test module plays one scenario once (a module-scoped fixture built on `phase`), and its
tests assert what the scenario must show. Everything listens on 127.0.0.1, every wait is
bounded, and every process a scenario starts (servers, k6, HAProxy, nginx) is stopped when its
module ends, whatever happens. Logs, k6's record of every request and the figures go to
target/test-logs/reliability/; the figures are printed after the tests and written to
target/test-logs/reliability/figures.json.

HAProxy and nginx are Debian's packages: installed when missing (as root), else a failure
that says so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import ROOT, Server, raise_fd_limit, stop_process
from loadgen import K6Load

WORK = ROOT / "target" / "test-logs" / "reliability"
NOTES: dict[str, list[str]] = {}
FIGURES: dict[str, object] = {}


def pytest_configure(config):
    raise_fd_limit()


def pytest_terminal_summary(terminalreporter):
    if not NOTES:
        return
    terminalreporter.section("reliability figures")
    for name, lines in NOTES.items():
        terminalreporter.write_line(f"{name}:")
        for line in lines:
            terminalreporter.write_line(f"    {line}")
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "figures.json").write_text(json.dumps(FIGURES, indent=2, default=str))
    terminalreporter.write_line(f"figures: {WORK / 'figures.json'}")


@pytest.fixture(scope="session")
def k6_bin() -> Path:
    found = shutil.which("k6", path=str(Path(sys.executable).parent)) or shutil.which("k6")
    if not found:
        pytest.fail("k6 is missing: run `make venv` (tests/requirements.txt)", pytrace=False)
    return Path(found)


def debian_tool(name: str) -> str:
    """The path of a Debian package's program, installing the package (as root) when missing."""

    def find():
        return shutil.which(name) or next(
            (p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.access(p, os.X_OK)), None)

    if not find() and os.geteuid() == 0:
        WORK.mkdir(parents=True, exist_ok=True)
        with open(WORK / f"apt-{name}.log", "wb") as log:
            subprocess.run("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq " + name,
                           shell=True, stdout=log, stderr=subprocess.STDOUT, timeout=600)
    path = find()
    if not path:
        pytest.fail(f"{name} is missing: apt-get install {name} (as root)", pytrace=False)
    return path


@pytest.fixture(scope="session")
def haproxy_bin() -> str:
    return debian_tool("haproxy")


@pytest.fixture(scope="session")
def nginx_bin() -> str:
    return debian_tool("nginx")


class Phase:
    """One module's scenario: its logs folder, and the servers, k6 loads and other processes it
    started (all stopped at its end); `note` records a figure line, `figures` what goes into
    figures.json."""

    def __init__(self, name: str, binary: Path, model_dir: Path, photo: Path, k6: Path):
        self.name, self.binary, self.model_dir, self.photo, self.k6 = name, binary, model_dir, photo, k6
        self.logs = WORK / name
        shutil.rmtree(self.logs, ignore_errors=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.servers: list[Server] = []
        self.loads: list[K6Load] = []
        self.procs: list[subprocess.Popen] = []
        self.figures: dict = {}
        self.t0 = time.monotonic()
        NOTES[name] = []
        FIGURES[name] = self.figures

    def note(self, text: str) -> None:
        NOTES[self.name].append(text)
        print(text, flush=True)

    def mark(self, text: str) -> None:
        """A note of an event with its time since the scenario's load began."""
        self.note(f"t={time.monotonic() - self.t0:5.1f}s  {text}")

    def server(self, name: str, args, **kw) -> Server:
        server = Server(self.binary, self.logs / f"{name}.log", list(args), model_dir=self.model_dir, **kw)
        self.servers.append(server.start())
        return server

    def load(self, port: int, vus: int, name: str = "load", **kw) -> K6Load:
        load = K6Load(self.k6, port, self.photo, vus, self.logs, name, **kw)
        self.loads.append(load)
        load.start()
        self.t0 = load.started
        return load

    def rolling_restart(self, servers: dict[str, Server], args, steady: float, balancer: str,
                        taken_out, put_back) -> dict[str, int | None]:
        """Replaces each server in turn, as a Deployment's rolling update does: SIGTERM; the
        balancer stops routing to it (`taken_out(name)` waits for that and returns the seconds
        it took); it exits; a new one starts on its port; once healthy the balancer routes to
        it again (`put_back(name)`); `steady` seconds of load. The old servers' exit statuses."""
        exit_codes = {}
        for name, old in servers.items():
            self.mark(f"SIGTERM {name} (pid {old.pid})")
            old.terminate()
            self.mark(f"{balancer} stops routing to {name} after {taken_out(name):.2f} s")
            exit_codes[name] = old.proc.wait(40)
            self.mark(f"{name} exited with {exit_codes[name]}")
            new = self.server(f"{name}2", args, port=old.port)
            self.mark(f"{name}' healthy after {new.wait_healthy():.1f} s")
            self.mark(f"{balancer} routes to {name}' after {put_back(name):.2f} s")
            time.sleep(steady)
        return exit_codes

    def spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        with open(self.logs / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for load in self.loads:
            load.kill()
        for server in self.servers:
            server.stop(timeout=30)
        for proc in self.procs:
            stop_process(proc, 10)


@pytest.fixture(scope="module")
def phase(request, tch_serve_bin, model_dir, photo_path, k6_bin):
    p = Phase(request.module.__name__.removeprefix("test_"), tch_serve_bin, model_dir, photo_path, k6_bin)
    yield p
    p.close()
