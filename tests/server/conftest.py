"""Real ``convoy serve`` processes for the HTTP tests, and helpers to talk to them.

Every server is a subprocess on a free port with ``CONVOY_CHECK_INTEGRITY=1``, so the engine
checks its KV pool after every step. After each test the servers' logs are scanned for engine
failures and unhandled exceptions (a client error must never become one), and at teardown each
server gets SIGTERM and must exit promptly after a graceful shutdown.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from convoy import LLM

SERVED_NAME = "tiny"
API_KEY = "secret"
MAX_MODEL_LEN = 512
# The main server leaves the KV block size to convoy: 128 tokens on CPU.
DEFAULT_CPU_BLOCK_SIZE = 128
SMALL_MODEL_LEN = 64
STARTUP_TIMEOUT_S = 60.0
# The fixture servers run with --shutdown-grace-s 2; uvicorn adds 5 s for open connections.
STOP_TIMEOUT_S = 15.0

# Log lines that mean the engine or the HTTP layer failed (rather than refused a bad request).
_BAD_LOG = re.compile(r"Traceback|step failed|Exception in ASGI application|Internal Server Error")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(eq=False)
class ServerProcess:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"

    def log(self, start: int = 0) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(start)
            return f.read().decode(errors="replace")

    def log_size(self) -> int:
        return self.log_path.stat().st_size


# Servers started by the fixtures below (their logs are checked after every test).
_LIVE: list[ServerProcess] = []


def start_server(model: str, log_path: Path, *args: str) -> ServerProcess:
    """Start ``convoy serve`` on a free port and wait (bounded) until /health answers 200."""
    env = {
        **os.environ,
        "CONVOY_CHECK_INTEGRITY": "1",
        "PYTHONUNBUFFERED": "1",
        # One intra-op thread: the model is tiny, and on two shared cores several servers with
        # a thread per core each slow down many times over whenever the machine is busy.
        "OMP_NUM_THREADS": "1",
    }
    for _ in range(3):  # the free port can be taken before the server binds it: try another
        port = free_port()
        cmd = [sys.executable, "-m", "convoy.cli", "serve", "--model", model, "--port", str(port)]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([*cmd, *args], stdout=log, stderr=subprocess.STDOUT, env=env)
        server = ServerProcess(proc, port, log_path)
        if _wait_healthy(server):
            return server
    pytest.fail(f"server could not bind a free port:\n{server.log()[-3000:]}")


def _wait_healthy(server: ServerProcess) -> bool:
    """True once /health answers 200; False if the port was taken; fails otherwise."""
    proc = server.proc
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            if "address already in use" in server.log():
                return False
            pytest.fail(f"server exited with {proc.returncode} at startup:\n{server.log()[-3000:]}")
        try:
            if httpx.get(f"{server.base_url}/health", timeout=1.0).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    proc.wait(10)
    pytest.fail(f"server not healthy within {STARTUP_TIMEOUT_S} s:\n{server.log()[-3000:]}")


def stop_server(server: ServerProcess, timeout: float = STOP_TIMEOUT_S) -> int:
    """SIGTERM; the process must exit within ``timeout`` s. Returns its exit code."""
    server.proc.send_signal(signal.SIGTERM)
    try:
        return server.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait(10)
        pytest.fail(f"server still running {timeout} s after SIGTERM:\n{server.log()[-3000:]}")


def assert_clean_exit(server: ServerProcess, returncode: int) -> None:
    log = server.log()
    ok = (0,)
    assert returncode in ok, f"exit code {returncode}:\n{log[-3000:]}"
    assert "Finished server process" in log, log[-3000:]


def bad_log_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if _BAD_LOG.search(line)]


def managed_server(
    tmp_path_factory: pytest.TempPathFactory, model: str, name: str, *args: str
) -> Iterator[ServerProcess]:
    """Start a server for a fixture; SIGTERM it and check its shutdown at teardown."""
    log_path = tmp_path_factory.mktemp(name) / "server.log"
    server = start_server(model, log_path, "--shutdown-grace-s", "2", *args)
    _LIVE.append(server)
    try:
        yield server
    finally:
        _LIVE.remove(server)
        if server.proc.poll() is None:
            assert_clean_exit(server, stop_server(server))


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (labels as rendered, comments dropped)."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    return values


def get_metrics(server: ServerProcess) -> dict[str, float]:
    r = httpx.get(f"{server.base_url}/metrics", timeout=10)
    assert r.status_code == 200
    return parse_metrics(r.text)


IDLE = {
    "convoy:num_requests_running": 0.0,
    "convoy:num_requests_waiting": 0.0,
    "convoy:kv_cache_usage_perc": 0.0,
}


def wait_idle(server: ServerProcess, timeout: float = 2.0) -> dict[str, float]:
    """Poll /metrics until nothing runs, waits or holds KV blocks; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        metrics = get_metrics(server)
        state = {k: metrics.get(k) for k in IDLE}
        if state == IDLE:
            return metrics
        if time.monotonic() > deadline:
            pytest.fail(f"server not idle {timeout} s later: {state}")
        time.sleep(0.05)


# -- fixtures ----------------------------------------------------------------------------------
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "engine_errors_expected: the test provokes an engine failure on purpose (a known "
        "convoy bug); skip the check that the server logs stay free of tracebacks",
    )


@pytest.fixture(scope="session")
def model_path(make_checkpoint: Callable[..., Path]) -> str:
    return str(make_checkpoint("llama"))


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, model_path: str) -> Iterator[ServerProcess]:
    """The main server: the tiny Llama served as 'tiny', 512 KV blocks, context 512."""
    yield from managed_server(
        tmp_path_factory,
        model_path,
        "server",
        "--served-model-name",
        SERVED_NAME,
        "--num-kv-blocks",
        "512",
        "--max-model-len",
        str(MAX_MODEL_LEN),
    )


@pytest.fixture(scope="session")
def limited_server(
    tmp_path_factory: pytest.TempPathFactory, model_path: str
) -> Iterator[ServerProcess]:
    """API key, one request in the engine and one queued, 4 KiB bodies at most."""
    yield from managed_server(
        tmp_path_factory,
        model_path,
        "limited",
        "--served-model-name",
        SERVED_NAME,
        "--num-kv-blocks",
        "512",
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--api-key",
        API_KEY,
        "--max-concurrent-requests",
        "1",
        "--max-queued-requests",
        "1",
        "--max-request-body-bytes",
        "4096",
    )


@pytest.fixture(scope="session")
def small_server(
    tmp_path_factory: pytest.TempPathFactory, model_path: str
) -> Iterator[ServerProcess]:
    """A 64-token context and 128 KV blocks of 16 tokens: any request is quick (fuzzing), and
    a few dozen concurrent ones run the pool dry (preemption). The blocks are short so that a
    request grows by several of them (one 128-token block would hold a whole context)."""
    yield from managed_server(
        tmp_path_factory,
        model_path,
        "small",
        "--served-model-name",
        SERVED_NAME,
        "--max-model-len",
        str(SMALL_MODEL_LEN),
        "--num-kv-blocks",
        "128",
        "--block-size",
        "16",
    )


@pytest.fixture(scope="session")
def llm(model_path: str) -> LLM:
    """The offline engine the server's output is compared with (same model and sizes)."""
    return LLM(model=model_path, num_kv_blocks=512, max_model_len=MAX_MODEL_LEN)


@pytest.fixture(autouse=True)
def _server_logs_stay_clean(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test: every live server is still up and logged no failure meanwhile."""
    start = {s: s.log_size() for s in _LIVE}
    yield
    if request.node.get_closest_marker("engine_errors_expected"):
        return
    time.sleep(0.05)  # let the servers flush what the last request logged
    for s in list(_LIVE):
        assert s.proc.poll() is None, f"server died:\n{s.log()[-3000:]}"
        bad = bad_log_lines(s.log(start.get(s, 0)))
        assert not bad, f"server logged failures: {bad[:5]}\n{s.log(start.get(s, 0))[-3000:]}"
