"""The extender as a user runs it (`module-controller extender` subprocess), registered in the real
kube-scheduler with the module profile; virtual Nodes made through the API."""

from __future__ import annotations

import json
import ssl
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from certs import pki
from devcluster.cluster import ControlPlane
from devcluster.processes import ManagedProcess, free_port
from extender.config import MODULE_SCHEDULER_NAME
from koupleless import keys
from tests.helpers import forbidden_lines
from tests.unit.extender.samples import SEED_JAR

CLI = [sys.executable, "-m", "koupleless"]
MANIFESTS = Path(__file__).resolve().parents[3] / "manifests" / "scheduler"


def _http_ok(port: int, path: str, scheme: str = "http", context: ssl.SSLContext | None = None) -> bool:
    with urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}{path}", timeout=2, context=context) as resp:
        return resp.status == 200


def _client_context(ca: pki.KeyPair | None) -> ssl.SSLContext | None:
    if ca is None:
        return None
    return ssl.create_default_context(cadata=ca.cert_pem.decode())


class RunningExtender:
    def __init__(self, process: ManagedProcess, port: int, scheme: str = "http",
                 ca: pki.KeyPair | None = None) -> None:
        self.process = process
        self.port = port
        self.url = f"{scheme}://127.0.0.1:{port}"
        self.context = _client_context(ca)

    def metrics(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=5, context=self.context) as resp:
            return resp.read().decode()

    def log(self) -> str:
        return self.process.log_path.read_text(errors="replace")


def start_extender(cp: ControlPlane, *extra: str, name: str = "extender", kubeconfig: Path | None = None,
                   ready_scheme: str = "http", ca: pki.KeyPair | None = None) -> RunningExtender:
    port = free_port()
    kube = ["--kubeconfig", str(kubeconfig or cp.kubeconfig)] if "--no-kube" not in extra else []
    args = [*CLI, "extender", *kube, "--host", "127.0.0.1", "--port", str(port), "--log-level", "debug", *extra]
    proc = ManagedProcess(name, args, cp.workdir / "logs" / f"{name}-{port}.log").start()
    context = _client_context(ca)
    proc.wait_ready(lambda: _http_ok(port, "/readyz", ready_scheme, context), timeout=60)
    return RunningExtender(proc, port, ready_scheme, ca)


def manifest_kubeconfig(cp: ControlPlane) -> Path:
    """A kubeconfig for the extender's ServiceAccount with exactly the RBAC of manifests/scheduler."""
    ns_yaml = cp.kubectl("create", "namespace", "module-controller", "--dry-run=client", "-o", "yaml").stdout
    cp.kubectl("apply", "-f", "-", input=ns_yaml)
    cp.kubectl("apply", "-f", str(MANIFESTS / "serviceaccount.yaml"), "-f", str(MANIFESTS / "rbac.yaml"))
    token = cp.kubectl("create", "token", "module-controller-extender", "-n", "module-controller",
                       "--duration=2h").stdout.strip()
    config = yaml.safe_load(Path(cp.kubeconfig).read_text())
    for user in config["users"]:
        user["user"] = {"token": token}
    path = cp.workdir / "extender.kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return path


def manifest_scheduler_config(url: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The extender entries and module profile of manifests/scheduler/kube-scheduler-config.yaml,
    pointed at `url`: the real kube-scheduler validates the shipped configuration in every run."""
    config = yaml.safe_load((MANIFESTS / "kube-scheduler-config.yaml").read_text())
    extenders = [{**entry, "urlPrefix": url} for entry in config["extenders"]]
    profiles = [p for p in config["profiles"] if p["schedulerName"] != "default-scheduler"]
    assert [p["schedulerName"] for p in profiles] == [MODULE_SCHEDULER_NAME]
    return extenders, profiles


@pytest.fixture(scope="module")
def extender(control_plane: ControlPlane) -> Iterator[RunningExtender]:
    """One extender (spread, the manifest's RBAC) registered with the session's kube-scheduler as the
    manifest registers it, for this module's tests; the default scheduler comes back afterwards."""
    running = start_extender(control_plane, kubeconfig=manifest_kubeconfig(control_plane))
    extenders, profiles = manifest_scheduler_config(running.url)
    control_plane.start_scheduler(extenders=extenders, extra_profiles=profiles)
    try:
        yield running
    finally:
        control_plane.start_scheduler()
        running.process.stop()
        log = running.log()
        assert not forbidden_lines(log), f"the extender needed more than its manifest RBAC: {forbidden_lines(log)}"


def module_pod(name: str, namespace: str, *, biz: str, base: str, versions: tuple[str, ...] = ("1.1.1",),
               labels: dict[str, str] | None = None) -> dict[str, Any]:
    """A module Pod as the webhook leaves it: the seed's shape, plus the module resource and the
    module scheduler's name (the webhook is not part of this test)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {keys.LABEL_COMPONENT: keys.COMPONENT_MODULE, **(labels or {})}},
        "spec": module_pod_spec(biz=biz, base=base, versions=versions),
    }


def module_pod_spec(*, biz: str, base: str, versions: tuple[str, ...] = ("1.1.1",)) -> dict[str, Any]:
    one = {keys.RESOURCE_MODULE: "1"}
    return {
        "schedulerName": MODULE_SCHEDULER_NAME,
        "containers": [{
            "name": biz,
            "image": SEED_JAR,
            "env": [{"name": keys.ENV_BIZ_VERSION, "value": "0.0.1-SNAPSHOT"}],
            "resources": {"requests": dict(one), "limits": dict(one)},
        }],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [
                {"key": keys.LABEL_BASE_STACK, "operator": "In", "values": ["java"]},
                {"key": keys.LABEL_BASE_VERSION, "operator": "In", "values": list(versions)},
                {"key": keys.LABEL_BASE_NAME, "operator": "In", "values": [base]},
            ]}
        ]}}},
        "tolerations": [keys.vnode_toleration()],
    }


def apply(cp: ControlPlane, *objects: dict[str, Any]) -> None:
    cp.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objects)}))


def get_json(cp: ControlPlane, *args: str) -> Any:
    return json.loads(cp.kubectl("get", *args, "-o", "json").stdout)
