"""A real MQTT broker for tests and `dev`: Debian's mosquitto on a free loopback port."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from devcluster.processes import ManagedProcess, StartError, free_port, tcp_open

_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


def find_mosquitto(install: bool = True) -> str:
    found = shutil.which("mosquitto") or next((c for c in _CANDIDATES if os.access(c, os.X_OK)), None)
    if found:
        return found
    if not install:
        raise StartError("mosquitto", "not installed — run `apt-get install mosquitto`", None)
    if os.geteuid() != 0:
        raise StartError("mosquitto", "not installed and not root — run `sudo apt-get install mosquitto`", None)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=False, env=env, capture_output=True)
    proc = subprocess.run(["apt-get", "install", "-y", "-qq", "mosquitto"], env=env, capture_output=True, text=True)
    found = next((c for c in _CANDIDATES if os.access(c, os.X_OK)), None)
    if not found:
        raise StartError("mosquitto", f"apt-get install mosquitto failed:\n{proc.stderr[-2000:]}", None)
    return found


@dataclass
class Broker:
    host: str = "127.0.0.1"
    port: int = 0
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="koupleless-mqtt-")))
    #: username -> password; empty means anonymous access.
    users: dict[str, str] = field(default_factory=dict)
    #: Serve TLS with this certificate and key (PEM files) instead of plain MQTT.
    tls_cert: Path | None = None
    tls_key: Path | None = None

    def start(self) -> Broker:
        binary = find_mosquitto()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        conf = self.workdir / "mosquitto.conf"
        lines = [
            f"listener {self.port} {self.host}",
            *self._tls_lines(),
            "persistence false",
            "log_dest stdout",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "max_queued_messages 100000",
            # Write each message at once rather than waiting for the previous one's TCP ACK (Nagle),
            # which can hold a command back by the peer's delayed-ACK timer, 40 ms.
            "set_tcp_nodelay true",
            # Stay the user that started us: dropping privileges would clear the parent-death signal
            # that stops the broker when its parent is killed.
            f"user {pwd.getpwuid(os.geteuid()).pw_name}",
        ]
        if self.users:
            passwd = self.workdir / "passwd"
            passwd.write_text("".join(f"{u}:{p}\n" for u, p in self.users.items()))
            subprocess.run([_passwd_tool(binary), "-U", str(passwd)], check=True, capture_output=True)
            lines += ["allow_anonymous false", f"password_file {passwd}"]
        else:
            lines.append("allow_anonymous true")
        conf.write_text("\n".join(lines) + "\n")
        self.process = ManagedProcess("mosquitto", [binary, "-c", str(conf)], self.workdir / "mosquitto.log").start()
        self.process.wait_ready(lambda: tcp_open(self.host, self.port), timeout=20)
        return self

    def _tls_lines(self) -> list[str]:
        if self.tls_cert is None and self.tls_key is None:
            return []
        if self.tls_cert is None or self.tls_key is None:
            raise StartError("mosquitto", "TLS needs both tls_cert and tls_key", None)
        return [f"certfile {self.tls_cert}", f"keyfile {self.tls_key}"]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def kill(self) -> None:
        """The broker dies at once (SIGKILL): every client's connection drops and, persistence being off,
        no session, subscription or queued message survives. `start()` (or `restart()`) brings it back
        on the same address; the workdir and its log are kept."""
        proc = getattr(self, "process", None)
        if proc is None or proc.proc is None or not proc.running():
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.proc.pid, signal.SIGKILL)
        proc.proc.wait(10)

    def restart(self) -> Broker:
        """Kill the broker and start a fresh one on the same port."""
        self.kill()
        return self.start()

    def stop(self) -> None:
        if getattr(self, "process", None):
            self.process.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _passwd_tool(binary: str) -> str:
    return shutil.which("mosquitto_passwd") or str(Path(binary).parent.parent / "bin" / "mosquitto_passwd")
