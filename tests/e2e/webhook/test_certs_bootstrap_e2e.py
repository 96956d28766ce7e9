"""The in-cluster certificate bootstrap (manifests/certs) against the real apiserver: the Job's own
command line, run with its ServiceAccount's token and nothing more than manifests/certs/rbac.yaml
grants; and the whole kustomize base accepted by a server-side dry run."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from cryptography import x509

from devcluster.cluster import ControlPlane

pytestmark = pytest.mark.controlplane

MANIFESTS = Path(__file__).resolve().parents[3] / "manifests"
NAMESPACE = "module-controller"
SERVICE_ACCOUNT = "module-controller-certs"


def job_args() -> list[str]:
    """The certs container's args of the bootstrap Job, as manifests/certs/cronjob.yaml writes them."""
    docs = list(yaml.safe_load_all((MANIFESTS / "certs" / "cronjob.yaml").read_text()))
    [job] = [d for d in docs if d["kind"] == "Job"]
    [container] = job["spec"]["template"]["spec"]["containers"]
    assert job["spec"]["template"]["spec"]["serviceAccountName"] == SERVICE_ACCOUNT
    return list(container["args"])


def flag(args: list[str], name: str) -> str:
    [value] = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    return value


def get_json(cp: ControlPlane, *args: str) -> Any:
    return orjson.loads(cp.kubectl("get", *args, "-o", "json").stdout)


def secret_bytes(secret: dict[str, Any], key: str) -> bytes:
    return base64.b64decode(secret["data"][key])


@pytest.fixture
def certs_rbac(control_plane: ControlPlane) -> Iterator[list[str]]:
    """Namespace, certs RBAC and the webhook configuration applied from manifests/; yields the Job's
    args. The configuration's namespaceSelector is narrowed to nothing: no webhook Pods run here, and
    with failurePolicy Fail it would refuse every module Pod the other suites create."""
    cp = control_plane
    args = job_args()
    tls_secret, ca_secret = flag(args, "tls-secret"), flag(args, "ca-secret")
    config_name = flag(args, "inject-live")
    cp.kubectl("apply", "-f", str(MANIFESTS / "namespace.yaml"))
    cp.kubectl("apply", "-f", str(MANIFESTS / "certs" / "rbac.yaml"))
    config = yaml.safe_load((MANIFESTS / "webhook" / "mutatingwebhookconfiguration.yaml").read_text())
    assert config["metadata"]["name"] == config_name
    for entry in config["webhooks"]:
        entry["namespaceSelector"] = {"matchLabels": {"koupleless-e2e/never": "true"}}
    cp.kubectl("apply", "-f", "-", input=orjson.dumps(config).decode())
    cp.kubectl("delete", "secret", "-n", NAMESPACE, tls_secret, ca_secret, "--ignore-not-found")
    try:
        yield args
    finally:
        cp.kubectl(
            "delete", "secret", "-n", NAMESPACE, tls_secret, ca_secret, "--ignore-not-found", check=False
        )
        cp.kubectl("delete", "mutatingwebhookconfiguration", config_name, "--ignore-not-found", check=False)
        cp.kubectl("delete", "-f", str(MANIFESTS / "certs" / "rbac.yaml"), "--ignore-not-found", check=False)


def run_job(cp: ControlPlane, args: list[str], out_dir: Path) -> subprocess.CompletedProcess[str]:
    """The Job's command line; only --out-dir (an emptyDir mount in the Pod) points at a temp dir.
    The ServiceAccount's token comes through $KUBECONFIG, as the in-cluster config would give it."""
    kubeconfig = cp.service_account_kubeconfig(NAMESPACE, SERVICE_ACCOUNT, hours=1)
    argv = [f"--out-dir={out_dir}" if a.startswith("--out-dir=") else a for a in args]
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    return subprocess.run(
        [sys.executable, "-m", "koupleless", *argv], capture_output=True, text=True, timeout=60, env=env
    )


def test_bootstrap_job_stores_the_ca_and_serving_pair_and_rotation_keeps_the_ca(
    control_plane: ControlPlane, certs_rbac: list[str], tmp_path: Path
) -> None:
    cp, args = control_plane, certs_rbac
    ca_secret, tls_secret = flag(args, "ca-secret"), flag(args, "tls-secret")
    config_name = flag(args, "inject-live")

    first = run_job(cp, args, tmp_path / "first")
    assert first.returncode == 0, first.stderr
    assert "Forbidden" not in first.stdout + first.stderr
    assert f"new CA stored in Secret {NAMESPACE}/{ca_secret}" in first.stdout

    ca = get_json(cp, "secret", "-n", NAMESPACE, ca_secret)
    tls = get_json(cp, "secret", "-n", NAMESPACE, tls_secret)
    ca_pem = secret_bytes(ca, "ca.crt")
    assert tls["type"] == "kubernetes.io/tls"
    assert secret_bytes(tls, "ca.crt") == ca_pem
    assert "ca.key" not in tls["data"], "the webhook's Secret must not carry the CA's key"
    serving = x509.load_pem_x509_certificate(secret_bytes(tls, "tls.crt"))
    serving.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_pem))
    names = serving.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert f"module-controller-webhook.{NAMESPACE}.svc" in names.get_values_for_type(x509.DNSName)
    live = get_json(cp, "mutatingwebhookconfiguration", config_name)
    assert [base64.b64decode(w["clientConfig"]["caBundle"]) for w in live["webhooks"]] == [ca_pem] * len(
        live["webhooks"]
    )

    # the monthly CronJob's run: a fresh Pod (empty out-dir), same command
    second = run_job(cp, args, tmp_path / "second")
    assert second.returncode == 0, second.stderr
    assert f"kept CA from Secret {NAMESPACE}/{ca_secret}" in second.stdout
    assert secret_bytes(get_json(cp, "secret", "-n", NAMESPACE, ca_secret), "ca.crt") == ca_pem
    rotated = get_json(cp, "secret", "-n", NAMESPACE, tls_secret)
    assert secret_bytes(rotated, "tls.crt") != secret_bytes(tls, "tls.crt")
    assert secret_bytes(rotated, "ca.crt") == ca_pem
    x509.load_pem_x509_certificate(secret_bytes(rotated, "tls.crt")).verify_directly_issued_by(
        x509.load_pem_x509_certificate(ca_pem)
    )
    live = get_json(cp, "mutatingwebhookconfiguration", config_name)
    assert {base64.b64decode(w["clientConfig"]["caBundle"]) for w in live["webhooks"]} == {ca_pem}


def test_without_the_rbac_the_job_says_what_is_missing(
    control_plane: ControlPlane, certs_rbac: list[str], tmp_path: Path
) -> None:
    cp, args = control_plane, certs_rbac
    cp.kubectl("delete", "rolebinding", "-n", NAMESPACE, SERVICE_ACCOUNT)
    proc = run_job(cp, args, tmp_path)
    assert proc.returncode == 1
    assert f"Secret {NAMESPACE}/{flag(args, 'ca-secret')}: 403 Forbidden" in proc.stderr, proc.stderr
    assert "manifests/certs/rbac.yaml" in proc.stderr


def test_the_whole_kustomize_base_passes_a_server_side_dry_run(control_plane: ControlPlane) -> None:
    cp = control_plane
    # a dry run creates nothing, so namespaced objects need their namespace to exist already
    cp.kubectl("apply", "-f", str(MANIFESTS / "namespace.yaml"))
    rendered = list(yaml.safe_load_all(cp.kubectl("kustomize", str(MANIFESTS)).stdout))
    proc = cp.kubectl("apply", "-k", str(MANIFESTS), "--dry-run=server", check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("(server dry run)") == len(rendered), proc.stdout
