"""Put a CA bundle where the apiserver reads it: a MutatingWebhookConfiguration, either in a
manifest file (before `kubectl apply`) or in the live object."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import yaml

from certs.pki import write_file
from koupleless.kube.client import KubeClient, resource_path

KIND = "MutatingWebhookConfiguration"
GROUP_VERSION = "admissionregistration.k8s.io/v1"


class InjectError(Exception):
    """Nothing to inject into; the message says what was looked for and where."""


def _encoded(ca_pem: bytes) -> str:
    return base64.b64encode(ca_pem).decode("ascii")


def inject_documents(docs: list[Any], ca_pem: bytes, name: str | None = None) -> int:
    """Set caBundle on every webhook of every MutatingWebhookConfiguration in `docs` (only the one
    called `name` when given); returns how many webhooks changed."""
    count = 0
    for doc in docs:
        if not isinstance(doc, dict) or doc.get("kind") != KIND:
            continue
        if name and (doc.get("metadata") or {}).get("name") != name:
            continue
        for webhook in doc.get("webhooks") or []:
            if isinstance(webhook, dict):
                webhook.setdefault("clientConfig", {})["caBundle"] = _encoded(ca_pem)
                count += 1
    return count


def inject_manifest(path: str | Path, ca_pem: bytes, name: str | None = None) -> int:
    path = Path(path)
    try:
        docs = list(yaml.safe_load_all(path.read_text()))
    except (OSError, yaml.YAMLError) as exc:
        raise InjectError(f"{path}: cannot read it as YAML: {exc}") from exc
    count = inject_documents(docs, ca_pem, name)
    if not count:
        which = f" named {name!r}" if name else ""
        raise InjectError(
            f"{path}: no {KIND}{which} with webhooks in it — pass the webhook configuration manifest"
        )
    write_file(path, yaml.safe_dump_all(docs, sort_keys=False).encode())
    return count


async def inject_live(client: KubeClient, name: str, ca_pem: bytes) -> int:
    """Patch caBundle into every webhook of the live configuration. The `test` ops pin each index to
    the webhook name read, so a concurrent edit makes the patch fail instead of landing on the wrong
    webhook."""
    path = resource_path(GROUP_VERSION, "mutatingwebhookconfigurations", name=name)
    current = await client.get(path)
    ops: list[dict[str, Any]] = []
    for i, webhook in enumerate(current.get("webhooks") or []):
        ops.append({"op": "test", "path": f"/webhooks/{i}/name", "value": webhook.get("name")})
        if "clientConfig" not in webhook:
            ops.append({"op": "add", "path": f"/webhooks/{i}/clientConfig", "value": {}})
        ops.append({"op": "add", "path": f"/webhooks/{i}/clientConfig/caBundle", "value": _encoded(ca_pem)})
    if not ops:
        raise InjectError(f"{KIND} {name} has no webhooks to inject a CA bundle into")
    await client.patch(path, ops, patch_type="json")
    return len(current.get("webhooks") or [])
