"""The webhook as users run it: `module-controller certs` then `module-controller webhook` in a child
process, registered with the real kube-apiserver by URL + caBundle.

The registration only covers namespaces labelled for these tests, so other suites sharing the
control plane never see this webhook (and a dead webhook cannot block them).
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

from devcluster.cluster import ControlPlane
from devcluster.processes import ManagedProcess, free_port
from extender.config import MODULE_SCHEDULER_NAME
from koupleless import keys
from tests.helpers import wait_until
from webhook.registration import webhook_configuration

NAMESPACE_LABEL = "koupleless-e2e/webhook"
CONFIG_NAME = "module-controller-webhook-e2e"
#: What the dev cluster's DefaultTolerationSeconds plugin gives Pods (devcluster.cluster.Timings).
EVICTION_SECONDS = 7


@dataclass
class RunningWebhook:
    port: int
    cert_dir: Path
    process: ManagedProcess

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def rotate_certs(self) -> None:
        """`module-controller certs` over this webhook's directory: same CA, new serving certificate."""
        _issue_certs(self.cert_dir)

    def served_serial(self) -> int:
        """Serial number of the certificate a new TLS handshake gets."""
        with (
            socket.create_connection(("127.0.0.1", self.port), timeout=5) as raw,
            self.ssl_context().wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert_dir / "ca.crt"))

    def get(self, path: str) -> tuple[int, str]:
        with urllib.request.urlopen(self.url + path, context=self.ssl_context(), timeout=5) as resp:
            return resp.status, resp.read().decode()


def _issue_certs(cert_dir: Path, *extra: str) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "koupleless",
            "certs",
            "--out-dir",
            str(cert_dir),
            "--ip",
            "127.0.0.1",
            *extra,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )


@pytest.fixture(scope="session")
def webhook(control_plane: ControlPlane) -> Iterator[RunningWebhook]:
    cert_dir = control_plane.workdir / "webhook-certs"
    port = free_port()
    _issue_certs(cert_dir)
    process = ManagedProcess(
        "webhook",
        [
            sys.executable,
            "-m",
            "koupleless",
            "webhook",
            "--host=127.0.0.1",
            f"--port={port}",
            f"--tls-cert-file={cert_dir / 'tls.crt'}",
            f"--tls-private-key-file={cert_dir / 'tls.key'}",
            "--tls-reload-interval=0.5",
            f"--apiserver-toleration-seconds={control_plane.timings.default_toleration_seconds}",
            f"--eviction-toleration-seconds={EVICTION_SECONDS}",
            # as manifests/webhook/deployment.yaml runs it
            f"--scheduler-name={MODULE_SCHEDULER_NAME}",
        ],
        control_plane.workdir / "logs" / "webhook.log",
    ).start()
    hook = RunningWebhook(port, cert_dir, process)
    try:
        process.wait_ready(lambda: hook.get("/readyz")[0] == 200, timeout=30)
        config = webhook_configuration(
            f"{hook.url}/mutate", (cert_dir / "ca.crt").read_bytes(), name=CONFIG_NAME
        )
        for entry in config["webhooks"]:
            entry["namespaceSelector"] = {"matchLabels": {NAMESPACE_LABEL: "on"}}
        control_plane.kubectl("apply", "-f", "-", input=json.dumps(config))
        _wait_until_admitting(control_plane)
        yield hook
    finally:
        control_plane.kubectl(
            "delete", "mutatingwebhookconfiguration", CONFIG_NAME, "--ignore-not-found", check=False
        )
        process.stop()


def _wait_until_admitting(control_plane: ControlPlane) -> None:
    """The apiserver picks up a new webhook configuration asynchronously: probe with a server-side
    dry run of a Pod only the webhook would reject."""
    probe_ns = f"webhook-probe-{free_port()}"
    control_plane.kubectl("create", "namespace", probe_ns)
    control_plane.kubectl("label", "namespace", probe_ns, f"{NAMESPACE_LABEL}=on")
    control_plane.wait_for_service_account(probe_ns)
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "probe", "namespace": probe_ns, "labels": {keys.LABEL_COMPONENT: "module"}},
        "spec": {"containers": [{"name": "probe", "image": "nginx"}]},
    }

    def denied() -> bool:
        proc = control_plane.kubectl(
            "apply", "--dry-run=server", "-f", "-", input=json.dumps(pod), check=False
        )
        return proc.returncode != 0 and "denied the request" in proc.stderr

    try:
        wait_until(denied, timeout=30, what="the apiserver to call the webhook")
    finally:
        control_plane.kubectl("delete", "namespace", probe_ns, "--wait=false", check=False)


@pytest.fixture
def webhook_namespace(control_plane: ControlPlane, namespace: str, webhook: RunningWebhook) -> str:
    """A fresh namespace whose Pods go through the webhook."""
    control_plane.kubectl("label", "namespace", namespace, f"{NAMESPACE_LABEL}=on")
    return namespace
