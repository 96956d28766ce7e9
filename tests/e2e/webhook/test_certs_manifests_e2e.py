"""`module-controller certs --inject-live` against the real apiserver, and manifests/webhook accepted
by it as written."""

from __future__ import annotations

import base64
import copy
import json
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import yaml

from devcluster.cluster import ControlPlane
from webhook.registration import ServiceRef, webhook_configuration

pytestmark = pytest.mark.controlplane

MANIFESTS = Path(__file__).resolve().parents[3] / "manifests" / "webhook"


def test_ca_bundle_is_patched_into_the_live_configuration(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    name = "inject-live-e2e"
    config = webhook_configuration(ServiceRef(), None, name=name)
    for entry in config["webhooks"]:
        # select nothing: this configuration must never be called
        entry["namespaceSelector"] = {"matchLabels": {"koupleless-e2e/never": "true"}}
    control_plane.kubectl("apply", "-f", "-", input=json.dumps(config))
    try:
        proc = subprocess.run(
            [
                sys.executable, "-m", "koupleless", "certs", "--out-dir", str(tmp_path),
                "--inject-live", name, "--kubeconfig", str(control_plane.kubeconfig),
            ],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert f"CA bundle patched into 3 webhook(s) of MutatingWebhookConfiguration {name}" in proc.stdout
        live = orjson.loads(
            control_plane.kubectl("get", "mutatingwebhookconfiguration", name, "-o", "json").stdout
        )
        ca_pem = (tmp_path / "ca.crt").read_bytes()
        assert [base64.b64decode(w["clientConfig"]["caBundle"]) for w in live["webhooks"]] == [ca_pem] * 3
    finally:
        control_plane.kubectl(
            "delete", "mutatingwebhookconfiguration", name, "--ignore-not-found", check=False
        )


def test_inject_live_into_a_missing_configuration_says_so(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    proc = subprocess.run(
        [
            sys.executable, "-m", "koupleless", "certs", "--out-dir", str(tmp_path),
            "--inject-live", "no-such-webhook", "--kubeconfig", str(control_plane.kubeconfig),
        ],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "MutatingWebhookConfiguration no-such-webhook: 404 NotFound" in proc.stderr


def test_manifests_are_accepted_by_the_apiserver(control_plane: ControlPlane, tmp_path: Path) -> None:
    ns = control_plane.kubectl(
        "create", "namespace", "module-controller", "--dry-run=client", "-o", "yaml"
    ).stdout
    control_plane.kubectl("apply", "-f", "-", input=ns)
    rendered = control_plane.kubectl("kustomize", str(MANIFESTS)).stdout
    docs = list(yaml.safe_load_all(rendered))
    assert sorted(d["kind"] for d in docs) == [
        "Deployment", "MutatingWebhookConfiguration", "PodDisruptionBudget", "Service", "ServiceAccount",
    ]  # fmt: skip
    # as a user would: certs injected into a copy of the manifest, then a server-side dry run
    manifest = tmp_path / "mutatingwebhookconfiguration.yaml"
    manifest.write_text((MANIFESTS / "mutatingwebhookconfiguration.yaml").read_text())
    subprocess.run(
        [sys.executable, "-m", "koupleless", "certs", "--out-dir", str(tmp_path), "--inject-manifest", str(manifest)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    others = [copy.deepcopy(d) for d in docs if d["kind"] != "MutatingWebhookConfiguration"]
    proc = control_plane.kubectl(
        "apply",
        "--dry-run=server",
        "-f",
        "-",
        input=yaml.safe_dump_all([*others, yaml.safe_load(manifest.read_text())]),
    )
    assert proc.stdout.count("(server dry run)") == 5, proc.stdout
