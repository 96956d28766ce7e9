"""manifests/webhook/ stays in step with the code that builds and serves the webhook."""

from __future__ import annotations

from pathlib import Path

import yaml

from extender.config import MODULE_SCHEDULER_NAME
from koupleless.cli import build_parser
from webhook.registration import DEFAULT_NAME, DEFAULT_NAMESPACE, ServiceRef, webhook_configuration

MANIFESTS = Path(__file__).resolve().parents[3] / "manifests" / "webhook"
SCHEDULER_CONFIG = MANIFESTS.parent / "scheduler" / "kube-scheduler-config.yaml"


def load(name: str) -> dict:
    return yaml.safe_load((MANIFESTS / name).read_text())


def test_webhook_configuration_manifest_is_the_generated_one() -> None:
    manifest = load("mutatingwebhookconfiguration.yaml")
    for webhook in manifest["webhooks"]:
        webhook["clientConfig"].pop("caBundle", None)
    assert manifest == webhook_configuration(ServiceRef(), None)


def test_every_listed_resource_exists_and_names_agree() -> None:
    kustomization = load("kustomization.yaml")
    assert kustomization["namespace"] == DEFAULT_NAMESPACE
    for resource in kustomization["resources"]:
        assert (MANIFESTS / resource).exists(), resource
    service = load("service.yaml")
    assert service["metadata"]["name"] == ServiceRef().name == DEFAULT_NAME
    deployment = load("deployment.yaml")
    assert deployment["spec"]["template"]["metadata"]["labels"] == service["spec"]["selector"]


def test_deployment_args_are_flags_the_webhook_accepts() -> None:
    container = load("deployment.yaml")["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    parsed = build_parser(args).parse_args(args)
    assert parsed.port == container["ports"][0]["containerPort"]
    mount = container["volumeMounts"][0]["mountPath"]
    assert parsed.tls_cert_file.startswith(mount) and parsed.tls_private_key_file.startswith(mount)


def test_deployment_sends_module_pods_to_the_extenders_profile() -> None:
    args = load("deployment.yaml")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert build_parser(args).parse_args(args).scheduler_name == MODULE_SCHEDULER_NAME
    profiles = yaml.safe_load(SCHEDULER_CONFIG.read_text())["profiles"]
    assert MODULE_SCHEDULER_NAME in [p["schedulerName"] for p in profiles]
