"""`eum serve` binds its port once and serves on that socket.

It tried the port (bound and let go at once), migrated the book, loaded the demo and
printed its keys, and only then did uvicorn bind the port again: a process that took the
port in between (another `eum serve`, anything with SO_REUSEADDR) made uvicorn fail its
own way after all that was done. The socket `serve` checks is the one the workers
serve now, listening from the check on (on Linux a socket only bound with SO_REUSEADDR
does not hold its port: another such socket binds it too, and the first to listen has
it)."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_cli_settings import _free_port, _run

REPO = Path(__file__).resolve().parents[1]


def _intruder(port: int) -> tuple[socket.socket | None, int | None]:
    """Another service taking the port as uvicorn would (SO_REUSEADDR, bind, listen): its
    socket, or the errno it was refused with."""
    other = socket.socket()
    other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        other.bind(("127.0.0.1", port))
        other.listen(8)
    except OSError as error:
        other.close()
        return None, error.errno
    return other, None


def test_the_port_is_held_from_the_check_to_the_serving(monkeypatch, tmp_path):
    """Another service taking the port while `serve` migrates the book is refused: the
    port is held from the check on, and the socket handed to uvicorn is that one,
    listening on it."""
    import eum.cli as cli

    monkeypatch.delenv("EUM_REDIS_URL", raising=False)
    port = _free_port()
    tried: list = []
    migrate = cli._migrate

    def migrate_while_another_takes_the_port(url):
        tried.append(_intruder(port))
        return migrate(url)

    served = []
    monkeypatch.setattr(cli, "_migrate", migrate_while_another_takes_the_port)
    monkeypatch.setattr(cli, "_serve_on", lambda config, listening: served.append(
        (listening.getsockname(), listening.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN),
         listening.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR), config.backlog)))
    try:
        out = _run(monkeypatch, {"EUM_DATABASE_URL": f"sqlite:///{tmp_path / 'eum.db'}"}, "serve",
                   "--port", str(port))
    finally:
        for other, _ in tried:
            if other is not None:
                other.close()
    assert [refused for _, refused in tried] == [errno.EADDRINUSE], tried
    assert out.exit_code == 0, (out.output, out.exception)
    assert served == [(("127.0.0.1", port), 1, 1, cli.LISTEN_BACKLOG)], served
    _intruder(port)[0].close()  # let go once `serve` returned (uvicorn's shutdown closes it, or `serve`)


def test_a_start_stopped_after_the_port_lets_it_go(monkeypatch):
    """A start that stops after the port is taken (here the database does not answer)
    lets it go: the port is free for the next start."""
    monkeypatch.setattr("eum.cli._serve_on", lambda *a, **k: pytest.fail("a worker was started"))
    port = _free_port()
    out = _run(monkeypatch, {"EUM_DATABASE_URL": "postgresql://postgres@127.0.0.1:9/x"}, "serve", "--port", str(port))
    assert out.exit_code == 3 and "cannot use the database" in out.stderr, out.output
    other, refused = _intruder(port)
    assert refused is None, refused
    other.close()


def test_an_unknown_host_is_one_line_and_exit_2(monkeypatch, tmp_path):
    monkeypatch.setattr("eum.cli._serve_on", lambda *a, **k: pytest.fail("a worker was started"))
    out = _run(monkeypatch, {"EUM_DATABASE_URL": f"sqlite:///{tmp_path / 'var' / 'eum.db'}"}, "serve",
               "--host", "no-such-host.invalid", "--port", "19240")
    assert out.exit_code == 2 and "Traceback" not in out.output, out.output
    assert out.stderr.startswith("error: cannot listen on no-such-host.invalid:19240 ("), out.stderr
    assert not (tmp_path / "var").exists()


@pytest.mark.skipif(not socket.has_ipv6 or not Path("/proc/net/if_inet6").is_file(), reason="no IPv6 here")
def test_an_ipv6_host_is_bound_as_ipv6():
    from eum.cli import _listen

    listening = _listen("::1", _free_port())
    try:
        assert listening.family == socket.AF_INET6 and listening.getsockname()[0] == "::1"
        assert listening.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    finally:
        listening.close()


def _listening_inodes(port: int) -> list[str]:
    """The inodes of the sockets listening on 127.0.0.1:`port` (/proc/net/tcp, state 0A)."""
    inodes = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == f"0100007F:{port:04X}" and fields[3] == "0A":
            inodes.append(fields[9])
    return inodes


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    return inodes


@pytest.mark.postgres
def _serve_env(database_url: str) -> dict[str, str]:
    """The environment a test's `eum serve` runs with: none of the caller's EUM_ settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EUM_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update({"EUM_DATABASE_URL": database_url, "EUM_LOG_JSON": "false", "EUM_POLICIES_DIR": str(REPO / "policies"),
                "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])})
    return env


def _stop(service: subprocess.Popen, signum: int, log_path: Path) -> None:
    """Send `signum`: the service must exit 0 (its log in the failure)."""
    os.kill(service.pid, signum)
    assert service.wait(timeout=60) == 0, log_path.read_text()[-3000:]


def _kill_if_running(service: subprocess.Popen) -> None:
    if service.poll() is None:
        os.killpg(service.pid, signal.SIGKILL)
        service.wait()


def test_two_workers_serve_on_the_socket_serve_bound(pg_url, tmp_path):
    """`eum serve --workers 2` (the Docker image's command) as a process, with another
    service trying to take the port while the book is migrated: refused, and the service
    serves; one socket listens on the port, the one the supervisor bound, and both
    workers hold it (not a socket of their own). SIGTERM stops it, exit 0. It was the
    other way round: the other service had the port and `serve` exited 3 once migrated."""
    import httpx

    from loadtests import harness as h

    port = _free_port()
    code = ("import socket, sys; import eum.cli as cli; migrate = cli._migrate; held = []\n"
            "def migrate_while_another_takes_the_port(url):\n"
            "    other = socket.socket(); other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            "    try:\n"
            f"        other.bind(('127.0.0.1', {port})); other.listen(8); held.append(other)\n"
            "        print('intruder: listening', file=sys.stderr, flush=True)\n"
            "    except OSError as error:\n"
            "        print(f'intruder: refused errno {error.errno}', file=sys.stderr, flush=True)\n"
            "    return migrate(url)\n"
            "cli._migrate = migrate_while_another_takes_the_port\n"
            f"sys.argv = ['eum', 'serve', '--host', '127.0.0.1', '--port', '{port}', '--workers', '2']; cli.main()")
    env = _serve_env(pg_url)
    log_path = tmp_path / "service.log"
    with open(log_path, "wb") as log:
        service = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        def ready() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        deadline = time.monotonic() + 120
        while not (ready() and len(h.worker_pids_of(service.pid)) == 2):
            assert service.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.1)
        [listening] = _listening_inodes(port)
        assert listening in _socket_inodes(service.pid)
        for worker in h.worker_pids_of(service.pid):
            assert listening in _socket_inodes(worker), worker
        _stop(service, signal.SIGTERM, log_path)
    finally:
        _kill_if_running(service)
    text = log_path.read_text()
    assert f"intruder: refused errno {errno.EADDRINUSE}" in text, text[-3000:]
    assert f"Uvicorn running on http://127.0.0.1:{port} (Press CTRL+C to quit)" in text, text[-3000:]
    assert "service.started" in text, text[-3000:]
    assert _listening_inodes(port) == []  # let go at the stop


def test_workers_stop_when_their_supervisor_is_killed_alone(pg_url, tmp_path):
    """kill -9 of the `eum serve` supervisor alone (its pid, not its group; the OOM
    killer): its workers notice and stop, and the port is let go, so the service can be
    started again. They had served on as orphans, unsupervised, holding the port: the
    next `eum serve` was refused (exit 2) until each was killed by hand."""
    import httpx

    from loadtests import harness as h

    port = _free_port()
    env = _serve_env(pg_url)
    log_path = tmp_path / "service.log"
    with open(log_path, "wb") as log:
        service = subprocess.Popen([sys.executable, "-m", "eum", "serve", "--port", str(port), "--workers", "2"],
                                   env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
            except httpx.TransportError:
                ready = False
            workers = h.worker_pids_of(service.pid)
            if ready and len(workers) == 2:
                break
            assert service.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.1)
        os.kill(service.pid, signal.SIGKILL)  # the supervisor alone
        service.wait()
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
                  for pid in workers):
            assert time.monotonic() < deadline, ("workers still running without their supervisor",
                                                 log_path.read_text()[-3000:])
            time.sleep(0.2)
        assert _listening_inodes(port) == [], "the port is still held"
    finally:
        for pid in workers:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        _kill_if_running(service)
    assert "service.supervisor_gone" in log_path.read_text(), log_path.read_text()[-3000:]


_ORPHANED_WORKER = """
import asyncio, multiprocessing, os, signal, sys

def worker(out):
    multiprocessing.parent_process().join()  # its supervisor is killed before its lifespan begins
    from api import app
    supervisor = app._supervisor_pid()
    stopped = []
    signal.signal(signal.SIGTERM, lambda *_: stopped.append("SIGTERM"))
    if supervisor is not None:
        asyncio.run(asyncio.wait_for(app._watch_supervisor(supervisor), 10))
    with open(out + ".part", "w") as f:
        f.write(f"{supervisor} {os.getppid() != supervisor} {stopped}")
    os.replace(out + ".part", out)

if __name__ == "__main__":
    os.environ["EUM_SUPERVISOR_PID"] = sys.argv[2] if len(sys.argv) > 2 else str(os.getpid())
    multiprocessing.get_context("spawn").Process(target=worker, args=(sys.argv[1],)).start()
    os.kill(os.getpid(), signal.SIGKILL)  # the supervisor alone, while its worker starts
"""


@pytest.mark.parametrize("named", ["itself", "another pid"])
def test_a_worker_orphaned_before_its_lifespan_still_stops(tmp_path, named):
    """The supervisor killed while a worker is still starting (CI, 2026-12-07: the test
    above killed it once /readyz answered from the first worker): the second worker's
    lifespan began with its parent already gone, found no supervisor to watch, and served
    on as an orphan holding the port. It now watches the supervisor multiprocessing
    spawned it from, and the watcher stops it at its first look. An environment naming
    some other pid than the process that spawned it names no supervisor of ours (pid 1
    here, which an orphan's new parent can be: it had been taken for the supervisor)."""
    script = tmp_path / "supervisor.py"
    script.write_text(_ORPHANED_WORKER)
    out = tmp_path / "out.txt"
    env = _serve_env("sqlite://")
    args = [sys.executable, str(script), str(out)] + (["1"] if named == "another pid" else [])
    supervisor = subprocess.Popen(args, env=env, cwd=tmp_path, stderr=subprocess.PIPE)
    _, stderr = supervisor.communicate(timeout=60)
    assert supervisor.returncode == -signal.SIGKILL, stderr.decode()[-3000:]
    deadline = time.monotonic() + 60
    while not out.exists():  # written whole, then renamed
        assert time.monotonic() < deadline, "the worker wrote nothing"
        time.sleep(0.1)
    supervisor_pid, orphaned, stopped = out.read_text().split(" ", 2)
    if named == "itself":
        assert (supervisor_pid, orphaned, stopped) == (str(supervisor.pid), "True", "['SIGTERM']")
    else:
        assert (supervisor_pid, stopped) == ("None", "[]")


def test_one_worker_serves_on_the_socket_serve_bound(tmp_path):
    """One worker (SQLite, scripts/serve.sh): the service's own process listens on the
    socket it bound, and serves; SIGINT stops it, exit 0."""
    import httpx

    port = _free_port()
    env = _serve_env(f"sqlite:///{tmp_path / 'eum.db'}")
    log_path = tmp_path / "service.log"
    with open(log_path, "wb") as log:
        service = subprocess.Popen([sys.executable, "-m", "eum", "serve", "--port", str(port)], env=env, cwd=tmp_path,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert service.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.1)
        [listening] = _listening_inodes(port)
        assert listening in _socket_inodes(service.pid)
        _stop(service, signal.SIGINT, log_path)
    finally:
        _kill_if_running(service)
    text = log_path.read_text()
    assert f"Uvicorn running on http://127.0.0.1:{port} (Press CTRL+C to quit)" in text, text[-3000:]
    assert "Application startup complete." in text and "Finished server process" in text, text[-3000:]
