"""A real MQTT broker for tests and `dev`: Debian's mosquitto on a free loopback port.

By default it runs the shipped security (manifests/broker): no anonymous clients, the provider
logs in as `provider`, each base as its own baseID (`add_bases`), and the ACL file is the shipped
one, read from the repository, so what the tests exercise is what a deployment gets. On top of it
the rig adds one test-only account, `fleet`, that may publish and read every koupleless topic: for
a simulator speaking for thousands of bases on one connection, and for tests that play a forger
or an operator on the wire. It is never in the shipped files.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from devcluster.processes import ManagedProcess, StartError, free_port, tcp_open

_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")

#: The broker configuration a deployment gets (mosquitto.conf, acl).
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "manifests" / "broker"
PROVIDER_USER = "provider"
#: Test-only: may publish and read every koupleless topic (see the module docstring).
FLEET_USER = "fleet"

_FLEET_ACL = f"""
# --- devcluster only, not shipped: one account that may speak for every base -------------------
user {FLEET_USER}
topic readwrite +/#
"""


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


def shipped_settings(section: str) -> list[str]:
    """The security lines of the shipped mosquitto.conf: `global` (before the first listener) or
    `client-cert` (the listener with require_certificate). Paths and ports are left out: those
    differ between a deployment and this rig."""
    wanted = {"per_listener_settings", "allow_anonymous", "require_certificate", "use_identity_as_username"}
    blocks: list[list[str]] = [[]]
    for raw in (SHIPPED_DIR / "mosquitto.conf").read_text().splitlines():
        line = raw.strip()
        if line.startswith("listener "):
            blocks.append([])
        elif line and not line.startswith("#") and line.split()[0] in wanted:
            blocks[-1].append(line)
    if section == "global":
        return blocks[0]
    return next(b for b in blocks[1:] if "require_certificate true" in b)


@dataclass
class Broker:
    host: str = "127.0.0.1"
    port: int = 0
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="koupleless-mqtt-")))
    #: The shipped security (see the module docstring). False: `users` decide, anonymous when empty.
    identity: bool = True
    #: username -> password: more accounts (with `identity`, the ACL patterns apply to them too).
    users: dict[str, str] = field(default_factory=dict)
    #: Serve TLS with this certificate and key (PEM files). Without `identity`: instead of plain
    #: MQTT; with it: on the client-certificate listener only.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: With `identity`: also listen on `client_cert_port` for bases that log in with a client
    #: certificate signed by this CA (the certificate's CN is the user name), as the shipped conf.
    client_ca: Path | None = None
    client_cert_port: int = 0
    #: Base accounts made by add_bases: baseID -> password.
    base_passwords: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._accounts = dict(self.users)
        if self.identity:
            self._accounts.setdefault(PROVIDER_USER, secrets.token_urlsafe(18))
            self._accounts.setdefault(FLEET_USER, secrets.token_urlsafe(18))

    def start(self) -> Broker:
        if self.identity and self.tls_cert is not None and self.client_ca is None:
            raise StartError("mosquitto", "with identity, tls_cert/tls_key serve the client-certificate listener: "
                             "give client_ca too (or identity=False for a TLS broker without accounts)", None)
        binary = find_mosquitto()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        conf = self.workdir / "mosquitto.conf"
        lines = [
            f"listener {self.port} {self.host}",
            *([] if self.identity else self._tls_lines()),
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
        if self.identity:
            acl = self.workdir / "acl"
            acl.write_text((SHIPPED_DIR / "acl").read_text() + _FLEET_ACL)
            self._write_passwords(binary)
            for user in (PROVIDER_USER, FLEET_USER):
                self.password_file_for(user).write_text(self._accounts[user] + "\n")
            lines += [*shipped_settings("global"), f"password_file {self.workdir / 'passwd'}", f"acl_file {acl}"]
            if self.client_ca is not None:
                self.client_cert_port = self.client_cert_port or free_port()
                lines += [f"listener {self.client_cert_port} {self.host}", *self._tls_lines(),
                          f"cafile {self.client_ca}", *shipped_settings("client-cert")]
        elif self._accounts:
            self._write_passwords(binary)
            lines += ["allow_anonymous false", f"password_file {self.workdir / 'passwd'}"]
        else:
            lines.append("allow_anonymous true")
        conf.write_text("\n".join(lines) + "\n")
        self.process = ManagedProcess("mosquitto", [binary, "-c", str(conf)], self.workdir / "mosquitto.log").start()
        self.process.wait_ready(lambda: tcp_open(self.host, self.port), timeout=20)
        return self

    def _write_passwords(self, binary: str) -> None:
        # Plain text first, then mosquitto's own tool hashes the file in place.
        passwd = self.workdir / "passwd"
        accounts = {**self._accounts, **self.base_passwords}
        passwd.write_text("".join(f"{u}:{p}\n" for u, p in accounts.items()))
        subprocess.run([_passwd_tool(binary), "-U", str(passwd)], check=True, capture_output=True)

    def _tls_lines(self) -> list[str]:
        if self.tls_cert is None and self.tls_key is None:
            return []
        if self.tls_cert is None or self.tls_key is None:
            raise StartError("mosquitto", "TLS needs both tls_cert and tls_key", None)
        return [f"certfile {self.tls_cert}", f"keyfile {self.tls_key}"]

    # --- accounts -------------------------------------------------------------------------------

    def password(self, user: str) -> str:
        return {**self._accounts, **self.base_passwords}[user]

    def password_file_for(self, user: str) -> Path:
        """Where the rig keeps `user`'s password for --mqtt-password-file (written at start)."""
        return self.workdir / f"{user}.password"

    def provider_args(self) -> list[str]:
        """The provider's credential flags for this broker (none when it takes anonymous clients)."""
        if not self.identity:
            return []
        return ["--mqtt-username", PROVIDER_USER, "--mqtt-password-file", str(self.password_file_for(PROVIDER_USER))]

    def fleet_args(self) -> list[str]:
        """Credential flags of the test-only fleet account, for a base-sim whose base IDs are not known
        ahead (UUID dialects): one shared login instead of one per base (none when anonymous)."""
        if not self.identity:
            return []
        return ["--mqtt-username", FLEET_USER, "--mqtt-password-file", str(self.password_file_for(FLEET_USER))]

    def login_as_fleet(self, client: mqtt.Client) -> mqtt.Client:
        """Give a test's own paho client the test-only fleet account (no-op without `identity`)."""
        if self.identity:
            client.username_pw_set(FLEET_USER, self.password(FLEET_USER))
        return client

    def add_bases(self, base_ids: Iterable[str], timeout: float = 20) -> Path:
        """An account per base (user = baseID, a new random password; a known base keeps its own),
        live on the running broker when this returns. Returns a file of `baseID:password` lines for
        exactly these bases: base-sim's --base-password-file."""
        ids = list(dict.fromkeys(base_ids))
        if not self.identity:
            raise ValueError("add_bases needs a Broker with identity=True")
        new = [b for b in ids if b not in self.base_passwords]
        for base_id in new:
            if any(c in base_id for c in "+#/:"):
                raise ValueError(f"base ID {base_id!r}: + # / : cannot be in an MQTT user name")
            self.base_passwords[base_id] = secrets.token_urlsafe(18)
        out = self.workdir / f"bases-{secrets.token_hex(4)}.passwords"
        out.write_text("".join(f"{b}:{self.base_passwords[b]}\n" for b in ids))
        out.chmod(0o600)
        proc = getattr(self, "process", None)
        if new and proc is not None and proc.running() and proc.pid is not None:
            self._write_passwords(find_mosquitto())
            os.kill(proc.pid, signal.SIGHUP)  # mosquitto reloads password_file and acl_file
            self._wait_login(new[-1], timeout)
        return out

    def _wait_login(self, user: str, timeout: float) -> None:
        """Poll until `user` can log in: mosquitto reloads on SIGHUP at its next loop turn."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            last = try_login(self.host, self.port, user, self.password(user))
            if last == "Success":
                return
            time.sleep(0.05)
        raise StartError("mosquitto", f"account {user!r} still refused {timeout:.0f}s after reload: {last}",
                         self.workdir / "mosquitto.log")

    # --- process --------------------------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def kill(self) -> None:
        """The broker dies at once (SIGKILL): every client's connection drops and, persistence being off,
        no session, subscription or queued message survives. `start()` (or `restart()`) brings it back
        on the same address, with the same accounts; the workdir and its log are kept."""
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


def try_login(host: str, port: int, user: str | None, password: str | None, timeout: float = 5) -> str:
    """Connect once and say what the broker answered: "Success", the refusal's reason
    ("Not authorized", "Bad user name or password"), or "no answer"."""
    answer: list[str] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"login-probe-{secrets.token_hex(4)}",
                         protocol=mqtt.MQTTv5)
    if user is not None:
        client.username_pw_set(user, password)
    client.on_connect = lambda _c, _u, _f, reason, _p: answer.append(str(reason))
    try:
        client.connect(host, port, keepalive=10)
    except OSError as exc:
        return f"cannot connect: {exc}"
    deadline = time.monotonic() + timeout
    try:
        while not answer and time.monotonic() < deadline:
            client.loop(0.1)
    finally:
        with contextlib.suppress(Exception):
            client.disconnect()
    return answer[0] if answer else "no answer"


def _passwd_tool(binary: str) -> str:
    return shutil.which("mosquitto_passwd") or str(Path(binary).parent.parent / "bin" / "mosquitto_passwd")
