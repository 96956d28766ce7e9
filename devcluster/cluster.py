"""A real local control plane: etcd, kube-apiserver, kube-controller-manager, kube-scheduler.

Everything binds 127.0.0.1 on free ports; certificates come from our own `certs.pki`. Timings that
make node loss take minutes in a production cluster are shortened so tests see it in seconds.

Note for tests: with no Ready Node at all, the node lifecycle controller enters "master disruption
mode" and removes unreachable taints instead of evicting; node-loss tests keep one healthy Node.
"""

from __future__ import annotations

import base64
import contextlib
import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from certs import pki
from devcluster.binaries import Binaries, ensure_binaries
from devcluster.processes import ManagedProcess, StartError, free_port


class KubectlError(subprocess.CalledProcessError):
    def __str__(self) -> str:
        return f"kubectl {' '.join(map(str, self.cmd[2:]))} failed (exit {self.returncode}): {self.stderr.strip()}"


@dataclass
class Timings:
    """Node-loss timings of the dev cluster (production defaults in comments)."""

    node_monitor_period: str = "2s"  # 5s
    node_monitor_grace_period: str = "20s"  # 50s
    node_startup_grace_period: str = "30s"  # 60s
    #: tolerationSeconds the DefaultTolerationSeconds plugin gives Pods that set none (300).
    default_toleration_seconds: int = 10

    @classmethod
    def kubernetes_defaults(cls) -> Timings:
        """What a user's cluster runs with: kube-controller-manager's and kube-apiserver's own
        defaults (Kubernetes 1.36), for measurements that must hold there."""
        return cls(node_monitor_period="5s", node_monitor_grace_period="50s", node_startup_grace_period="1m0s",
                   default_toleration_seconds=300)


@dataclass
class ControlPlane:
    binaries: Binaries | None = None
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="koupleless-devcluster-")))
    timings: Timings = field(default_factory=Timings)
    keep_workdir: bool = False
    #: kube-apiserver serves /debug/pprof (for a bench to read where its CPU goes); off otherwise.
    profiling: bool = False

    def __post_init__(self) -> None:
        self.processes: dict[str, ManagedProcess] = {}
        self.ca: pki.KeyPair | None = None
        self.server = ""
        self.kubeconfig = self.workdir / "admin.kubeconfig"
        self._scheduler_generation = 0

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> ControlPlane:
        if self.binaries is None:
            self.binaries = ensure_binaries()
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self._write_pki()
            self._start_etcd()
            self._start_apiserver()
            self._start_controller_manager()
            self.start_scheduler()
            self._wait_for_default_service_account()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        # Everything that talks to etcd stops at once (one by one, each allowed its 10 s of graceful
        # shutdown, a loaded machine took over a minute), then etcd.
        clients = [p for name, p in self.processes.items() if name != "etcd"]
        for proc in clients:
            proc.terminate()
        for proc in clients:
            proc.wait_stopped()
        if "etcd" in self.processes:
            self.processes["etcd"].stop()
        self.processes.clear()
        if not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.processes.items() if p.pid is not None}

    # --- kubectl ------------------------------------------------------------------------------

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        assert self.binaries is not None
        proc = subprocess.run(
            [str(self.binaries.kubectl), f"--kubeconfig={self.kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise KubectlError(proc.returncode, proc.args, proc.stdout, proc.stderr)
        return proc

    def api_get(self, path: str) -> Any:
        """GET an API path as admin; for readiness checks and tests that want raw JSON."""
        import orjson

        with urllib.request.urlopen(self.server + path, context=self._admin_ssl(), timeout=5) as resp:
            return orjson.loads(resp.read())

    # --- kube-scheduler -----------------------------------------------------------------------

    def start_scheduler(
        self,
        extenders: list[dict[str, Any]] | None = None,
        *,
        extra_profiles: list[dict[str, Any]] | None = None,
        **profile_extra: Any,
    ) -> None:
        """(Re)start kube-scheduler; `extenders` become the config's `extenders` list and
        `extra_profiles` follow the default-scheduler profile (e.g. the module scheduler's)."""
        if "kube-scheduler" in self.processes:
            self.processes.pop("kube-scheduler").stop()
        self._scheduler_generation += 1
        config: dict[str, Any] = {
            "apiVersion": "kubescheduler.config.k8s.io/v1",
            "kind": "KubeSchedulerConfiguration",
            "clientConnection": {"kubeconfig": str(self.kubeconfig), "qps": 200, "burst": 400},
            "leaderElection": {"leaderElect": False},
            "profiles": [{"schedulerName": "default-scheduler", **profile_extra}, *(extra_profiles or [])],
        }
        if extenders:
            config["extenders"] = extenders
        path = self.workdir / f"scheduler-{self._scheduler_generation}.yaml"
        path.write_text(yaml.safe_dump(config))
        self.scheduler_config = path
        port = free_port()
        assert self.binaries is not None
        proc = self._spawn(
            "kube-scheduler",
            [
                str(self.binaries.kube_scheduler),
                f"--config={path}",
                f"--authentication-kubeconfig={self.kubeconfig}",
                f"--authorization-kubeconfig={self.kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={port}",
                "--v=1",
            ],
        )
        proc.wait_ready(lambda: self._https_ok(port, "/healthz"), timeout=60)

    def restart_controller_manager(self) -> None:
        """A fresh kube-controller-manager. Its node lifecycle controller taints unreachable Nodes
        through a rate-limited queue (--node-eviction-rate, one Node per 10 s): Nodes an earlier run
        left unreachable keep that queue busy after they are deleted, delaying a later run's
        evictions by minutes. A bench that times node loss run after run starts each with a new one."""
        if "kube-controller-manager" in self.processes:
            self.processes.pop("kube-controller-manager").stop()
        self._start_controller_manager()

    # --- internals ----------------------------------------------------------------------------

    def _spawn(self, name: str, args: list[str]) -> ManagedProcess:
        proc = ManagedProcess(name, args, self.workdir / "logs" / f"{name}.log").start()
        self.processes[name] = proc
        return proc

    def _write_pki(self) -> None:
        d = self.workdir / "pki"
        self.ca = pki.new_ca("koupleless-devcluster-ca", days=30)
        self.ca.write(d / "ca.crt", d / "ca.key")
        serving = pki.issue(
            self.ca,
            "kube-apiserver",
            dns_names=["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"],
            ips=["127.0.0.1", "10.0.0.1"],
            days=30,
        )
        serving.write(d / "apiserver.crt", d / "apiserver.key")
        self.admin = pki.issue(
            self.ca, "admin", organizations=["system:masters"], days=30, server=False, client=True
        )
        self.admin.write(d / "admin.crt", d / "admin.key")
        sa_key = pki.new_key()
        pki.write_file(d / "sa.key", pki.key_pem(sa_key), private=True)
        pki.write_file(d / "sa.pub", pki.public_key_pem(sa_key))
        # kube-apiserver -> kubelet (here: the provider's kubelet API for virtual Nodes), as kubeadm
        # sets it up: the apiserver's client certificate and the kubelets' serving certificate both
        # come from the cluster CA, and the apiserver verifies the kubelet's (--kubelet-certificate-
        # authority). system:masters lets the kubelet's SubjectAccessReview for nodes/proxy pass.
        pki.issue(self.ca, "kube-apiserver-kubelet-client", organizations=["system:masters"], days=30,
                  server=False, client=True).write(d / "apiserver-kubelet-client.crt", d / "apiserver-kubelet-client.key")
        pki.issue(self.ca, "koupleless-provider-kubelet", dns_names=["localhost"], ips=["127.0.0.1"], days=30).write(
            d / "kubelet-serving.crt", d / "kubelet-serving.key")
        self.pki_dir = d

    def kubelet_args(self, port: int) -> list[str]:
        """`module-controller provider` flags that serve the kubelet API of its virtual Nodes to this
        kube-apiserver on 127.0.0.1:`port` (for kubectl logs / exec on module Pods)."""
        d = self.pki_dir
        return ["--kubelet-port", str(port), "--kubelet-address", "127.0.0.1", "--kubelet-bind-address", "127.0.0.1",
                "--kubelet-client-ca", str(d / "ca.crt"), "--kubelet-tls-cert", str(d / "kubelet-serving.crt"),
                "--kubelet-tls-key", str(d / "kubelet-serving.key")]

    def _admin_ssl(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki_dir / "ca.crt"))
        ctx.load_cert_chain(self.pki_dir / "admin.crt", self.pki_dir / "admin.key")
        return ctx

    def _https_ok(self, port: int, path: str) -> bool:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # the component's own self-signed serving cert
        with urllib.request.urlopen(f"https://127.0.0.1:{port}{path}", context=ctx, timeout=2) as resp:
            return bool(resp.status == 200)

    def _start_etcd(self) -> None:
        client, peer = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{client}"
        assert self.binaries is not None
        proc = self._spawn(
            "etcd",
            [
                str(self.binaries.etcd),
                "--name=devcluster",
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-cluster=devcluster=http://127.0.0.1:{peer}",
                "--unsafe-no-fsync=true",
                "--log-level=warn",
            ],
        )

        def healthy() -> bool:
            with urllib.request.urlopen(self.etcd_url + "/health", timeout=2) as resp:
                return b'"health":"true"' in resp.read()

        proc.wait_ready(healthy, timeout=60)

    def _start_apiserver(self) -> None:
        port = free_port()
        self.server = f"https://127.0.0.1:{port}"
        d = self.pki_dir
        t = self.timings
        assert self.binaries is not None
        proc = self._spawn(
            "kube-apiserver",
            [
                str(self.binaries.kube_apiserver),
                f"--etcd-servers={self.etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={port}",
                f"--cert-dir={self.workdir / 'apiserver-certs'}",
                f"--tls-cert-file={d / 'apiserver.crt'}",
                f"--tls-private-key-file={d / 'apiserver.key'}",
                f"--client-ca-file={d / 'ca.crt'}",
                f"--kubelet-client-certificate={d / 'apiserver-kubelet-client.crt'}",
                f"--kubelet-client-key={d / 'apiserver-kubelet-client.key'}",
                f"--kubelet-certificate-authority={d / 'ca.crt'}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={d / 'sa.pub'}",
                f"--service-account-signing-key-file={d / 'sa.key'}",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--authorization-mode=RBAC",
                "--allow-privileged=true",
                f"--default-not-ready-toleration-seconds={t.default_toleration_seconds}",
                f"--default-unreachable-toleration-seconds={t.default_toleration_seconds}",
                f"--profiling={'true' if self.profiling else 'false'}",
                "--v=1",
            ],
        )
        self._write_kubeconfig()
        proc.wait_ready(lambda: self._api_ok("/readyz"), timeout=120)

    def _api_ok(self, path: str) -> bool:
        with urllib.request.urlopen(self.server + path, context=self._admin_ssl(), timeout=3) as resp:
            return bool(resp.status == 200)

    def _write_kubeconfig(self) -> None:
        user = {
            "client-certificate-data": base64.b64encode(self.admin.cert_pem).decode(),
            "client-key-data": base64.b64encode(self.admin.key_pem).decode(),
        }
        self._write_kubeconfig_file(self.kubeconfig, "admin", user)

    def _write_kubeconfig_file(
        self, path: Path, user_name: str, user: dict[str, str], namespace: str | None = None
    ) -> None:
        assert self.ca is not None
        context: dict[str, str] = {"cluster": "devcluster", "user": user_name}
        if namespace:
            context["namespace"] = namespace
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "devcluster", "cluster": {
                "server": self.server, "certificate-authority-data": base64.b64encode(self.ca.cert_pem).decode()}}],
            "users": [{"name": user_name, "user": user}],
            "contexts": [{"name": user_name, "context": context}],
            "current-context": user_name,
        }
        pki.write_file(path, yaml.safe_dump(config).encode(), private=True)

    def _start_controller_manager(self) -> None:
        port = free_port()
        d = self.pki_dir
        t = self.timings
        assert self.binaries is not None
        proc = self._spawn(
            "kube-controller-manager",
            [
                str(self.binaries.kube_controller_manager),
                f"--kubeconfig={self.kubeconfig}",
                f"--authentication-kubeconfig={self.kubeconfig}",
                f"--authorization-kubeconfig={self.kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={port}",
                "--leader-elect=false",
                "--controllers=*",
                "--use-service-account-credentials=false",
                f"--service-account-private-key-file={d / 'sa.key'}",
                f"--root-ca-file={d / 'ca.crt'}",
                f"--cluster-signing-cert-file={d / 'ca.crt'}",
                f"--cluster-signing-key-file={d / 'ca.key'}",
                f"--node-monitor-period={t.node_monitor_period}",
                f"--node-monitor-grace-period={t.node_monitor_grace_period}",
                f"--node-startup-grace-period={t.node_startup_grace_period}",
                "--concurrent-deployment-syncs=10",
                "--concurrent-replicaset-syncs=10",
                "--v=1",
            ],
        )
        proc.wait_ready(lambda: self._https_ok(port, "/healthz"), timeout=60)

    def _wait_for_default_service_account(self, timeout: float = 60) -> None:
        # The ServiceAccount admission plugin refuses Pods until the namespace's `default` SA exists.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                self.api_get("/api/v1/namespaces/default/serviceaccounts/default")
                return
            time.sleep(0.2)
        cm = self.processes.get("kube-controller-manager")
        raise StartError("kube-controller-manager", "no default ServiceAccount after 60s",
                         cm.log_path if cm else None)

    def service_account_kubeconfig(self, namespace: str, name: str, hours: int = 24) -> Path:
        """A kubeconfig that authenticates as the ServiceAccount `namespace/name` (a bound token), so a
        component runs with exactly the RBAC its manifests grant."""
        token = self.kubectl("create", "token", name, "-n", namespace, f"--duration={hours}h").stdout.strip()
        path = self.workdir / f"sa-{namespace}-{name}.kubeconfig"
        self._write_kubeconfig_file(path, name, {"token": token}, namespace)
        return path

    def wait_for_service_account(self, namespace: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                self.api_get(f"/api/v1/namespaces/{namespace}/serviceaccounts/default")
                return
            time.sleep(0.1)
        raise TimeoutError(f"namespace {namespace}: no default ServiceAccount after {timeout:.0f}s")
