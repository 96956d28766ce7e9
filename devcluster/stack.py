"""The whole system on one machine: control plane, broker, webhook, extender, provider and simulated
bases, each a real process wired to the others exactly as in a cluster. Used by `module-controller dev`
and by the end-to-end test of that command."""

from __future__ import annotations

import contextlib
import json
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from certs import pki
from devcluster.binaries import KUBERNETES_VERSION
from devcluster.broker import Broker
from devcluster.cluster import ControlPlane, Timings
from devcluster.processes import ManagedProcess, StartError, free_port
from extender.config import MODULE_SCHEDULER_NAME
from provider.basesim import default_id_prefix, sim_base_ids

MANIFESTS = Path(__file__).resolve().parent.parent / "manifests"
SAMPLE_DEPLOYMENT = MANIFESTS / "samples" / "module-deployment.yaml"
CONTROLLER_NAMESPACE = "module-controller"
SAMPLE_NAME = "test-module-deployment"


@dataclass
class StackOptions:
    bases: int = 3
    env: str = "dev"
    base_name: str = "base"
    base_version: str = "1.1.1"
    max_modules: int = 10
    apply_sample: bool = True
    workdir: Path | None = None
    #: Node-loss timings of the control plane (default: the dev cluster's shortened ones).
    timings: Timings = field(default_factory=Timings)
    #: Flags appended to the provider's and the webhook's command lines (benchmarks comparing defaults).
    provider_args: tuple[str, ...] = ()
    webhook_args: tuple[str, ...] = ()


@dataclass
class DevStack:
    options: StackOptions = field(default_factory=StackOptions)
    progress: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True)
    #: A control plane already running (a bench's), to add components to; stop() leaves it running.
    #: None: start() starts one of its own.
    shared_plane: ControlPlane | None = None

    def __post_init__(self) -> None:
        # A directory the user named is theirs: kept on exit (its logs are worth reading); only a
        # temp dir made here is removed.
        self.owns_workdir = self.options.workdir is None
        self.workdir = self.options.workdir or Path(tempfile.mkdtemp(prefix="koupleless-dev-"))
        self.plane = self.shared_plane or ControlPlane(workdir=self.workdir / "cluster", keep_workdir=True,
                                                       timings=self.options.timings)
        self.broker = Broker(workdir=self.workdir / "broker")
        self.components: dict[str, ManagedProcess] = {}
        self.base_sim_port = 0

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> DevStack:
        try:
            self.progress("[1/8] control plane: etcd, kube-apiserver, kube-controller-manager, kube-scheduler")
            self.plane.start()
            self.progress("[2/8] mosquitto MQTT broker; the controller's ServiceAccounts and RBAC")
            self.broker.start()
            self.install_rbac()
            self.progress("[3/8] webhook (validates and defaults module Pods)")
            self.start_webhook()
            self.progress("[4/8] scheduler extender, registered with kube-scheduler")
            self.start_extender()
            self.progress("[5/8] provider (bases become virtual Nodes)")
            self._start_provider()
            self.progress(f"[6/8] {self.options.bases} simulated bases {self.options.base_name} "
                          f"{self.options.base_version}")
            self._start_bases()
            self._wait_nodes_ready()
            if self.options.apply_sample:
                self.progress("[7/8] the seed's sample Deployment (manifests/samples/module-deployment.yaml)")
                self.plane.kubectl("apply", "-f", str(SAMPLE_DEPLOYMENT))
                self.progress("[8/8] waiting for the module to be Running")
                self.wait_sample_running()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        self.stop_components()
        self.broker.stop()
        if self.shared_plane is None:
            self.plane.stop()
        if self.owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # --- components ---------------------------------------------------------------------------

    def stop_components(self) -> None:
        """Stop the processes this stack started (the webhook's registration stays: see
        unregister_webhook)."""
        for name in reversed(list(self.components)):
            self.components[name].stop()
        self.components.clear()

    def _cli(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "koupleless.cli", *args]

    def _spawn(self, name: str, args: list[str]) -> ManagedProcess:
        proc = ManagedProcess(name, args, self.workdir / "logs" / f"{name}.log").start()
        self.components[name] = proc
        return proc

    def start_webhook(self) -> None:
        from webhook.registration import webhook_configuration

        d = self.workdir / "webhook-certs"
        ca = pki.new_ca("koupleless-dev-webhook-ca", days=30)
        ca.write(d / "ca.crt", d / "ca.key")
        pki.issue(ca, "module-controller-webhook", dns_names=["localhost"], ips=["127.0.0.1"], days=30).write(
            d / "tls.crt", d / "tls.key"
        )
        port = free_port()
        proc = self._spawn(
            "webhook",
            self._cli("webhook", "--host", "127.0.0.1", "--port", str(port), "--tls-cert-file", str(d / "tls.crt"),
                      "--tls-private-key-file", str(d / "tls.key"), "--env", self.options.env,
                      # The dev cluster's own default tolerations are shortened too; say so, so the
                      # webhook recognises (and sets) them.
                      "--apiserver-toleration-seconds", str(self.plane.timings.default_toleration_seconds),
                      # The profile registered with the extender (see start_extender).
                      "--scheduler-name", MODULE_SCHEDULER_NAME, *self.options.webhook_args),
        )
        proc.wait_ready(lambda: _https_ok(f"https://127.0.0.1:{port}/readyz", d / "ca.crt"), timeout=30)
        config = webhook_configuration(f"https://127.0.0.1:{port}/mutate", ca.cert_pem)
        self.plane.kubectl("apply", "-f", "-", input=json.dumps(config))
        self._wait_until_admitting()

    def _wait_until_admitting(self) -> None:
        """kube-apiserver picks up a new webhook configuration asynchronously: a server-side dry run
        of a module Pod only the webhook would refuse tells when it is in force."""

        def denied() -> bool:
            out = self._dry_run_probe()
            return out.returncode != 0 and "denied the request" in out.stderr

        self.poll(denied, 30, "kube-apiserver to call the webhook", component="webhook")

    def unregister_webhook(self) -> None:
        """Delete the webhook's registration and wait until kube-apiserver admits without it, so the
        webhook can stop without module Pods being refused meanwhile (its failurePolicy is Fail)."""
        from webhook.registration import DEFAULT_NAME

        self.plane.kubectl("delete", "mutatingwebhookconfiguration", DEFAULT_NAME, "--ignore-not-found")
        self.poll(lambda: self._dry_run_probe().returncode == 0, 30, "kube-apiserver to stop calling the webhook",
                  component="webhook")

    def _dry_run_probe(self) -> subprocess.CompletedProcess[str]:
        """A server-side dry run of a module Pod only the webhook refuses (its image is no jar)."""
        probe = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "webhook-probe", "namespace": "default",
                         "labels": {"module-controller.koupleless.io/component": "module"}},
            "spec": {"containers": [{"name": "probe", "image": "not-a-jar"}]},
        }
        return self.plane.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(probe), check=False)

    def install_rbac(self) -> None:
        """The ServiceAccounts and RBAC of manifests/, so each component runs with exactly the
        rights a real install grants it (a missing verb shows up here as a Forbidden)."""
        self.plane.kubectl("apply", "-f", str(MANIFESTS / "namespace.yaml"))
        for component in ("provider", "scheduler"):
            self.plane.kubectl("apply", "-f", str(MANIFESTS / component / "serviceaccount.yaml"),
                               "-f", str(MANIFESTS / component / "rbac.yaml"))

    def _component_kubeconfig(self, service_account: str) -> Path:
        return self.plane.service_account_kubeconfig(CONTROLLER_NAMESPACE, service_account)

    def start_extender(self) -> None:
        from extender.config import extender_entry, module_profile

        port = free_port()
        proc = self._spawn(
            "extender",
            self._cli("extender", "--host", "127.0.0.1", "--port", str(port), "--kubeconfig",
                      str(self._component_kubeconfig("module-controller-extender"))),
        )
        proc.wait_ready(lambda: _http_ok(f"http://127.0.0.1:{port}/readyz"), timeout=30)
        self.plane.start_scheduler(extenders=[extender_entry(f"http://127.0.0.1:{port}")],
                                   extra_profiles=[module_profile()])

    def _start_provider(self) -> None:
        port = free_port()
        proc = self._spawn(
            "provider",
            self._cli("provider", "--kubeconfig", str(self._component_kubeconfig("module-controller-provider")),
                      "--mqtt-broker", self.broker.address, *self.broker.provider_args(),
                      "--env", self.options.env, "--max-modules", str(self.options.max_modules),
                      "--http-host", "127.0.0.1", "--http-port", str(port),
                      # kubectl logs / exec on module Pods: kube-apiserver calls the provider.
                      *self.plane.kubelet_args(free_port()), *self.options.provider_args),
        )
        proc.wait_ready(lambda: _http_ok(f"http://127.0.0.1:{port}/readyz"), timeout=30)

    def _start_bases(self) -> None:
        o = self.options
        self.base_sim_port = self.start_base_sim("base-sim", o.bases, o.base_name, o.base_version)

    def start_base_sim(self, label: str, count: int, name: str, version: str, *extra: str) -> int:
        """One more base-sim process of `count` bases `name` `version` on this stack's broker and env,
        each logged in as its own baseID; returns its status port (/bases, kill, restart)."""
        port = free_port()
        proc = self._spawn(
            label,
            self._cli("base-sim", "--mqtt-broker", self.broker.address, "--env", self.options.env, "--count", str(count),
                      "--name", name, "--version", version, "--status-port", str(port),
                      *self.base_logins(sim_base_ids(default_id_prefix(name, version), count)), *extra),
        )
        proc.wait_ready(lambda: _http_ok(f"http://127.0.0.1:{port}/readyz"), timeout=30)
        return port

    def base_logins(self, base_ids: list[str]) -> list[str]:
        """base-sim's flags for these bases to log in to the dev broker, each as its own baseID
        (the accounts are made now)."""
        return ["--base-password-file", str(self.broker.add_bases(base_ids))]

    def _wait_nodes_ready(self, timeout: float = 90) -> None:
        self.poll(lambda: len(self.ready_vnodes()) >= self.options.bases or None, timeout,
                  f"{self.options.bases} virtual Nodes Ready", component="provider")

    # --- queries ------------------------------------------------------------------------------

    def ready_vnodes(self) -> list[dict[str, Any]]:
        nodes = orjson.loads(self.plane.kubectl(
            "get", "nodes", "-l", "virtual-kubelet.koupleless.io/component=vnode", "-o", "json").stdout)["items"]
        return [n for n in nodes if any(c["type"] == "Ready" and c["status"] == "True"
                                        for c in n.get("status", {}).get("conditions", []))]

    def sample_pods(self) -> list[dict[str, Any]]:
        out = self.plane.kubectl("get", "pods", "-n", "default", "-l", "app=test-module-deployment-non-peer",
                                 "-o", "json").stdout
        return list(orjson.loads(out)["items"])

    def wait_sample_running(self, timeout: float = 90) -> dict[str, Any]:
        def running() -> dict[str, Any] | None:
            return next((p for p in self.sample_pods() if p.get("status", {}).get("phase") == "Running"
                         and any(c["type"] == "Ready" and c["status"] == "True"
                                 for c in p["status"].get("conditions", []))), None)

        pod: dict[str, Any] = self.poll(running, timeout, "the sample module Running", component="provider")
        return pod

    def poll(self, check: Callable[[], Any], timeout: float, what: str, component: str) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.components.items():
                if not proc.running():
                    raise StartError(name, f"exited while waiting for {what}", proc.log_path)
            with contextlib.suppress(Exception):
                result = check()
                if result:
                    return result
            time.sleep(0.5)
        waited_on = self.components.get(component)
        raise StartError(component, f"timed out after {timeout:.0f}s waiting for {what}",
                         waited_on.log_path if waited_on else None)

    def bin_dir(self) -> Path:
        """A directory holding only `kubectl`, to put on PATH (the cache also holds the server binaries)."""
        directory = self.workdir / "bin"
        directory.mkdir(exist_ok=True)
        link = directory / "kubectl"
        if not link.exists():
            assert self.plane.binaries is not None
            link.symlink_to(self.plane.binaries.kubectl)
        return directory

    def usage(self, pod: dict[str, Any]) -> str:
        """What `dev` prints once the module runs: real values in the seed's commands."""
        kubeconfig = self.plane.kubeconfig
        node = pod["spec"]["nodeName"]
        ip = pod["status"].get("podIP", "")
        base_id = node.removeprefix("virtual-node-")
        return "\n".join([
            "",
            "The sample module is Running. In another shell:",
            "",
            f"  export KUBECONFIG={kubeconfig}",
            f"  export PATH={self.bin_dir()}:$PATH   # kubectl {KUBERNETES_VERSION}",
            "",
            "  # the module's Deployment and Pods",
            "  kubectl get deployment test-module-deployment",
            "  kubectl get pods -o wide",
            f"  kubectl logs {pod['metadata']['name']}   # the module's install history and state",
            "",
            "  # Checking Module Status (seed): the modules on one base, by its IP or by its node name",
            f"  kubectl get pod -n default --field-selector status.podIP={ip}",
            f"  kubectl get pod -n default --field-selector spec.nodeName=virtual-node-{base_id}",
            "",
            "  # scale, replace, roll back, take offline",
            "  kubectl scale deployments/test-module-deployment --namespace=default --replicas=3",
            "  kubectl rollout history deployment test-module-deployment",
            "  kubectl delete deployment test-module-deployment --namespace default",
            "",
            f"  {sys.executable} -m koupleless.cli status --kubeconfig {kubeconfig}",
            "",
            f"MQTT broker {self.broker.address}: no anonymous clients; each base logs in as its own baseID",
            f"(passwords: {self.broker.workdir}/bases-*.passwords), the provider as provider (README \"Security\").",
            "",
            f"Logs: {self.workdir / 'logs'}   Stop: Ctrl-C (stops everything this command started).",
        ])


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as resp:
        return bool(resp.status == 200)


def _https_ok(url: str, ca_file: Path) -> bool:
    ctx = ssl.create_default_context(cafile=str(ca_file))
    with urllib.request.urlopen(url, context=ctx, timeout=2) as resp:
        return bool(resp.status == 200)
