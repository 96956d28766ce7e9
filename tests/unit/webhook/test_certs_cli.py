"""`module-controller certs`: files a webhook can serve with, and a CA bundle the apiserver can use."""

from __future__ import annotations

import base64
import datetime as dt
import stat
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from koupleless.cli import main
from webhook.registration import (
    LEGACY_WEBHOOK_NAME,
    WEBHOOK_NAME,
    WORKLOAD_WEBHOOK_NAME,
    ServiceRef,
    webhook_configuration,
)


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def sans(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return ext.get_values_for_type(x509.DNSName), [str(ip) for ip in ext.get_values_for_type(x509.IPAddress)]


def test_writes_a_serving_pair_signed_by_the_ca(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(
        [
            "certs",
            "--out-dir",
            str(tmp_path),
            "--dns-name",
            "hook.example",
            "--ip",
            "127.0.0.1",
            "--days",
            "2",
        ]
    )
    assert rc == 0
    ca, leaf = load_cert(tmp_path / "ca.crt"), load_cert(tmp_path / "tls.crt")
    leaf.verify_directly_issued_by(ca)
    assert sans(leaf) == (["hook.example"], ["127.0.0.1"])
    lifetime = leaf.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=1) < lifetime <= dt.timedelta(days=2)
    public = leaf.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp256r1"
    assert stat.S_IMODE((tmp_path / "tls.key").stat().st_mode) == 0o600
    assert "new CA" in capsys.readouterr().out


def test_default_names_are_the_in_cluster_service(tmp_path: Path) -> None:
    assert main(["certs", "--out-dir", str(tmp_path)]) == 0
    dns, _ = sans(load_cert(tmp_path / "tls.crt"))
    assert "module-controller-webhook.module-controller.svc" in dns


def test_rerun_keeps_the_ca_and_reissues_the_leaf(tmp_path: Path) -> None:
    args = ["certs", "--out-dir", str(tmp_path), "--ip", "127.0.0.1"]
    assert main(args) == 0
    ca_before, leaf_before = (tmp_path / "ca.crt").read_bytes(), load_cert(tmp_path / "tls.crt")
    assert main(args) == 0
    assert (tmp_path / "ca.crt").read_bytes() == ca_before
    leaf_after = load_cert(tmp_path / "tls.crt")
    assert leaf_after.serial_number != leaf_before.serial_number
    leaf_after.verify_directly_issued_by(load_cert(tmp_path / "ca.crt"))
    assert main([*args, "--new-ca"]) == 0
    assert (tmp_path / "ca.crt").read_bytes() != ca_before


def test_bad_ip_is_explained(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["certs", "--out-dir", str(tmp_path), "--ip", "hook.local"]) == 1
    assert "--ip 'hook.local' is not an IP address; put host names in --dns-name" in capsys.readouterr().err


def test_ca_bundle_goes_into_the_manifest(tmp_path: Path) -> None:
    manifest = tmp_path / "webhook.yaml"
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}}
    config = webhook_configuration(ServiceRef(), None)
    manifest.write_text(yaml.safe_dump_all([service, config], sort_keys=False))
    assert main(["certs", "--out-dir", str(tmp_path), "--inject-manifest", str(manifest)]) == 0
    docs = list(yaml.safe_load_all(manifest.read_text()))
    assert docs[0] == service
    ca_pem = (tmp_path / "ca.crt").read_bytes()
    bundles = [base64.b64decode(w["clientConfig"]["caBundle"]) for w in docs[1]["webhooks"]]
    assert bundles == [ca_pem, ca_pem, ca_pem]
    assert docs[1]["webhooks"][0]["clientConfig"]["service"]["name"] == "module-controller-webhook"


def test_manifest_without_a_webhook_configuration_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = tmp_path / "other.yaml"
    manifest.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: x}\n")
    assert main(["certs", "--out-dir", str(tmp_path), "--inject-manifest", str(manifest)]) == 1
    assert "no MutatingWebhookConfiguration with webhooks in it" in capsys.readouterr().err


def test_configuration_matches_both_label_keys_without_overlap() -> None:
    config = webhook_configuration(
        "https://127.0.0.1:9443/mutate", b"PEM", namespace_exclusions=["kube-system"]
    )
    seed, legacy, workloads = config["webhooks"]
    assert (seed["name"], legacy["name"], workloads["name"]) == (
        WEBHOOK_NAME,
        LEGACY_WEBHOOK_NAME,
        WORKLOAD_WEBHOOK_NAME,
    )
    assert workloads["rules"][0]["apiGroups"] == ["apps"]
    assert "objectSelector" not in workloads
    assert "object.spec.template.metadata.labels" in workloads["matchConditions"][0]["expression"]
    assert seed["objectSelector"]["matchExpressions"] == [
        {"key": "module-controller.koupleless.io/component", "operator": "In", "values": ["module"]}
    ]
    assert legacy["objectSelector"]["matchExpressions"] == [
        {"key": "virtual-kubelet.koupleless.io/component", "operator": "In", "values": ["module"]},
        {"key": "module-controller.koupleless.io/component", "operator": "NotIn", "values": ["module"]},
    ]
    for webhook in config["webhooks"]:
        assert webhook["clientConfig"] == {"url": "https://127.0.0.1:9443/mutate", "caBundle": "UEVN"}
        assert webhook["failurePolicy"] == "Fail" and webhook["sideEffects"] == "None"
        assert webhook["timeoutSeconds"] == 5
        assert webhook["namespaceSelector"]["matchExpressions"][0]["values"] == ["kube-system"]
    with pytest.raises(ValueError, match="must start with https://"):
        webhook_configuration("http://127.0.0.1/mutate", None)
