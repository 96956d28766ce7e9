"""The provider and base-sim as the user runs them: subprocesses of `module-controller`, against the
session's control plane and mosquitto. Each test gets its own env (topics, Node label) and cleans up
the Nodes it made, so tests never see each other's bases.

Every test that has a `namespace` also has its Pods' phases watched from start to end: a Pod whose
phase ever went backwards (Running -> Pending, Failed -> anything) fails it at teardown."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devcluster.broker import Broker
from devcluster.cluster import ControlPlane
from devcluster.processes import ManagedProcess, free_port
from koupleless import keys
from provider.basesim import sim_base_ids
from tests.e2e.phasewatch import PhaseWatch
from tests.helpers import wait_until

CLI = [sys.executable, "-m", "koupleless"]


class Sim:
    def __init__(self, process: ManagedProcess, port: int) -> None:
        self.process = process
        self.port = port

    def _call(self, method: str, path: str) -> Any:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method)
        with urllib.request.urlopen(req, timeout=5) as resp:
            return json.loads(resp.read())

    def bases(self) -> dict[str, Any]:
        return self._call("GET", "/bases")["bases"]

    def modules(self, base_id: str) -> list[dict[str, Any]]:
        return self.bases()[base_id]["modules"]

    def kill(self, base_id: str) -> None:
        self._call("POST", f"/bases/{base_id}/kill")

    def shutdown(self, base_id: str) -> None:
        self._call("POST", f"/bases/{base_id}/shutdown")

    def restart(self, base_id: str) -> None:
        self._call("POST", f"/bases/{base_id}/restart")

    def pause(self) -> None:
        """SIGSTOP the whole simulator: its bases fall silent with their TCP connection still open
        (a network partition); `resume` heals it and the MQTT session carries on."""
        assert self.process.pid is not None
        os.killpg(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process.pid is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGCONT)


class System:
    """One provider and any number of base-sim processes, on one env."""

    def __init__(self, cp: ControlPlane, broker: Broker, workdir: Path) -> None:
        self.cp = cp
        self.broker = broker
        self.workdir = workdir
        self.env = "e2e" + uuid.uuid4().hex[:6]
        self.processes: list[ManagedProcess] = []
        self.provider: ManagedProcess | None = None
        self.provider_port = 0
        self.phase_watch: PhaseWatch | None = None

    def use_broker(self, broker: Broker) -> None:
        """Run this test's provider and bases on `broker` (e.g. one the test kills) instead of the
        session's; only before anything is started."""
        assert not self.processes, "use_broker before starting the provider or any base-sim"
        self.broker = broker

    def watch_phases(self, namespace: str) -> PhaseWatch:
        """Record every Pod phase in `namespace` from now on; checked when the test ends."""
        if self.phase_watch is None:
            self.phase_watch = PhaseWatch(self.cp, namespace).start()
        return self.phase_watch

    def start_provider(self, *extra: str, name: str = "provider", wait_ready: bool = True,
                       env: dict[str, str] | None = None) -> ManagedProcess:
        self.provider_port = free_port()
        args = [
            *CLI, "provider", "--kubeconfig", str(self.cp.kubeconfig), "--mqtt-broker", self.broker.address,
            "--env", self.env, "--identity", f"{self.env}-{name}", "--http-host", "127.0.0.1",
            "--http-port", str(self.provider_port), "--heartbeat-interval", "1", "--missed-heartbeats", "3",
            "--resync-interval", "2", "--health-interval", "5", "--log-level", "debug",
            # The virtual Nodes' kubelet API on a port of its own (kubectl logs / exec).
            *self.cp.kubelet_args(free_port()), *self.broker.provider_args(), *extra,
        ]
        proc = ManagedProcess(name, args, self.workdir / f"{name}.log", env=_with_env(env)).start()
        self.processes.append(proc)
        port = self.provider_port
        if wait_ready:
            proc.wait_ready(lambda: _http_ok(port, "/readyz"), timeout=60)
        self.provider = proc
        return proc

    def start_sim(self, *extra: str, count: int = 3, name: str = "base", version: str = "1.1.1",
                  id_prefix: str | None = None, env: dict[str, str] | None = None) -> Sim:
        port = free_port()
        label = f"sim-{len(self.processes)}"
        # Base IDs unique to this test: Node and Lease names never collide with an earlier test's.
        id_prefix = id_prefix or f"{self.env[3:]}-{name}-{version.replace('.', '-')}-"
        args = [
            *CLI, "base-sim", "--mqtt-broker", self.broker.address, "--env", self.env, "--count", str(count),
            "--name", name, "--version", version, "--heartbeat-interval", "1", "--status-port", str(port),
            "--id-prefix", id_prefix, *self._base_logins(id_prefix, count, extra), *extra,
        ]
        proc = ManagedProcess(label, args, self.workdir / f"{label}.log", env=_with_env(env)).start()
        self.processes.append(proc)
        proc.wait_ready(lambda: _http_ok(port, "/readyz"), timeout=30)
        return Sim(proc, port)

    def _base_logins(self, id_prefix: str, count: int, extra: tuple[str, ...]) -> list[str]:
        """On the shipped broker security every base logs in as its own baseID; bases of the old
        dialects name themselves by a random UUID per start, so they share the fleet login."""
        if not self.broker.identity:
            return []
        if "--dialect" in extra and extra[extra.index("--dialect") + 1] != "current":
            return self.broker.fleet_args()
        return ["--base-password-file", str(self.broker.add_bases(sim_base_ids(id_prefix, count)))]

    def kubectl_json(self, *args: str) -> Any:
        return json.loads(self.cp.kubectl(*args, "-o", "json").stdout)

    def nodes(self) -> list[dict[str, Any]]:
        return self.kubectl_json("get", "nodes", "-l", f"{keys.LABEL_VNODE_ENV}={self.env}")["items"]

    def wait_nodes_ready(self, count: int, timeout: float = 60) -> list[dict[str, Any]]:
        def ready() -> list[dict[str, Any]] | None:
            nodes = [n for n in self.nodes() if node_ready(n) == "True"]
            return nodes if len(nodes) == count else None

        return wait_until(ready, timeout, what=f"{count} Ready virtual Nodes")

    def stop(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()
        with contextlib.suppress(Exception):
            self.cp.kubectl("delete", "nodes", "-l", f"{keys.LABEL_VNODE_ENV}={self.env}", "--wait=false")
            self.cp.kubectl("delete", "leases", "-n", "kube-node-lease", "-l", f"{keys.LABEL_VNODE_ENV}={self.env}",
                            "--wait=false")


PROVIDER_MANIFESTS = Path(__file__).resolve().parents[3] / "manifests" / "provider"


def manifest_rbac_kubeconfig(cp: ControlPlane) -> Path:
    """A kubeconfig for the provider's ServiceAccount with exactly the RBAC of manifests/provider."""
    ns_yaml = cp.kubectl("create", "namespace", "module-controller", "--dry-run=client", "-o", "yaml").stdout
    cp.kubectl("apply", "-f", "-", input=ns_yaml)
    cp.kubectl("apply", "-f", str(PROVIDER_MANIFESTS / "serviceaccount.yaml"),
               "-f", str(PROVIDER_MANIFESTS / "rbac.yaml"))
    return cp.service_account_kubeconfig("module-controller", "module-controller-provider", hours=1)


def node_ready(node: dict[str, Any]) -> str:
    for c in node.get("status", {}).get("conditions", []):
        if c["type"] == "Ready":
            return str(c["status"])
    return "Unknown"


def _with_env(extra: dict[str, str] | None) -> dict[str, str] | None:
    return {**os.environ, **extra} if extra else None


def http_status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _http_ok(port: int, path: str) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
        return bool(resp.status == 200)


@pytest.fixture
def system(control_plane: ControlPlane, mqtt_broker: Broker, tmp_path: Path,
           request: pytest.FixtureRequest) -> Iterator[System]:
    s = System(control_plane, mqtt_broker, tmp_path)
    if "namespace" in request.fixturenames:
        s.watch_phases(request.getfixturevalue("namespace"))
    try:
        yield s
    finally:
        watch = s.phase_watch
        try:
            if watch is not None:
                watch.stop()  # the namespace as the test left it, while its provider still runs
        finally:
            s.stop()
        if watch is not None:
            watch.assert_never_regressed()


@pytest.fixture
def own_broker() -> Iterator[Broker]:
    """A broker for this test alone, for tests that kill or restart it (never the session's)."""
    with Broker() as broker:
        yield broker
