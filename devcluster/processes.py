"""Child processes that die with us: started in their own session, stopped by PID, logs kept for errors."""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # If the test run or `dev` is killed outright (SIGKILL, crash), the kernel kills the children,
    # so no control-plane process is left behind. SIGKILL, not SIGTERM: a kube-apiserver whose etcd
    # is being stopped at the same moment can hang in its graceful shutdown.
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


#: Ports for servers we start come from below the kernel's ephemeral range: a port the kernel calls
#: free there can be some outgoing connection's local port a moment later, before the child binds it
#: (seen as kube-apiserver's "bind: address already in use" with two test runs side by side).
_LOWEST_PORT = 10_000
#: One file per port handed out, so concurrent runs on this machine never hand out the same port;
#: a reservation older than this is stale (its run ended or long since bound it).
_RESERVATIONS = Path(tempfile.gettempdir()) / "koupleless-ports"
_RESERVATION_TTL_S = 900.0
_random = random.Random()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _reserve(port: int) -> bool:
    path = _RESERVATIONS / str(port)
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        return True
    except FileExistsError:
        try:
            if time.time() - path.stat().st_mtime < _RESERVATION_TTL_S:
                return False
            os.utime(path)
            return True
        except OSError:
            return False


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A loopback TCP port nobody uses, reserved for the caller against other runs on this machine."""
    high = _ephemeral_low() - 1
    if high - _LOWEST_PORT >= 1000:
        with contextlib.suppress(OSError):
            _RESERVATIONS.mkdir(mode=0o700, exist_ok=True)
            for _ in range(500):
                port = _random.randint(_LOWEST_PORT, high)
                if _reserve(port) and _bindable(port):
                    return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class StartError(RuntimeError):
    """A component did not come up: says which, why, and the tail of its log."""

    def __init__(self, component: str, why: str, log_path: Path | None) -> None:
        tail = log_tail(log_path) if log_path else ""
        msg = f"{component} failed to start: {why}"
        if tail:
            msg += f"\n--- last lines of {log_path} ---\n{tail}"
        super().__init__(msg)
        self.component = component


def log_tail(path: Path | None, lines: int = 25) -> str:
    if path is None or not path.exists():
        return ""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 16384))
        data = f.read().decode(errors="replace")
    return "\n".join(data.splitlines()[-lines:])


class ManagedProcess:
    def __init__(self, name: str, args: Sequence[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.args = list(args)
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
                env=self.env,
            )
        except OSError as exc:
            raise StartError(self.name, f"cannot execute {self.args[0]}: {exc}", None) from exc
        finally:
            log.close()
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, check: Callable[[], bool], timeout: float = 60.0, interval: float = 0.2) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running():
                code = self.proc.returncode if self.proc else None
                raise StartError(self.name, f"exited with code {code}", self.log_path)
            with contextlib.suppress(Exception):
                if check():
                    return
            time.sleep(interval)
        raise StartError(self.name, f"not ready after {timeout:.0f}s", self.log_path)

    def stop(self, timeout: float = 10.0) -> None:
        self.terminate()
        self.wait_stopped(timeout)

    def terminate(self) -> None:
        """Ask the process group to stop (SIGTERM) without waiting: several can stop at once."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)

    def wait_stopped(self, timeout: float = 10.0) -> None:
        """Wait for a terminated process; SIGKILL it after `timeout`."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def tcp_open(host: str, port: int) -> bool:
    with socket.create_connection((host, port), timeout=1):
        return True
