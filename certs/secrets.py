"""The webhook's CA and serving pair kept in Secrets, for `module-controller certs` run in-cluster
(manifests/certs): the CA lives in a Secret only the certs Job reads, so every run (the bootstrap
Job, then the monthly CronJob) signs with the same CA and the caBundle the apiserver trusts never
changes; the serving pair goes to the kubernetes.io/tls Secret the webhook mounts.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

from certs import pki
from koupleless.kube.client import ApiError, KubeClient, resource_path

CA_CERT, CA_KEY, TLS_CERT, TLS_KEY = "ca.crt", "ca.key", "tls.crt", "tls.key"
TLS_TYPE = "kubernetes.io/tls"
MANAGED_BY = {"app.kubernetes.io/managed-by": "module-controller-certs"}


class SecretError(Exception):
    """A Secret that cannot be read or written; the message names it and the fix."""


def secret_path(namespace: str, name: str | None = None) -> str:
    return resource_path("v1", "secrets", namespace=namespace, name=name)


def _encode(data: Mapping[str, bytes]) -> dict[str, str]:
    return {k: base64.b64encode(v).decode("ascii") for k, v in data.items()}


def _explain(exc: ApiError, namespace: str, name: str) -> SecretError:
    fix = ""
    if exc.status in (401, 403):
        fix = (
            " — the ServiceAccount needs get/update/patch on this Secret and create on secrets in "
            f"{namespace} (manifests/certs/rbac.yaml)"
        )
    return SecretError(f"Secret {namespace}/{name}: {exc}{fix}")


def ca_from_secret(secret: Mapping[str, Any], namespace: str, name: str) -> pki.KeyPair:
    where = f"Secret {namespace}/{name}"
    data = secret.get("data") or {}
    missing = [k for k in (CA_CERT, CA_KEY) if not data.get(k)]
    if missing:
        raise SecretError(
            f"{where} has no {' or '.join(missing)} — it does not hold a CA; delete it to have a new "
            "CA made (the webhook configuration's caBundle is updated with it)"
        )
    try:
        return pki.from_pem(base64.b64decode(data[CA_CERT]), base64.b64decode(data[CA_KEY]), where)
    except ValueError as exc:
        raise SecretError(f"{exc} — delete the Secret to have a new CA made") from None


async def load_or_create_ca(
    client: KubeClient, namespace: str, name: str, days: int, *, new: bool = False
) -> tuple[pki.KeyPair, bool]:
    """The CA kept in Secret `namespace/name`, or a new one stored there first; True when new.

    The Secret is written before anything is signed with a new CA, so a run that fails later never
    leaves a serving certificate from a CA nobody kept. Two runs racing to create it both end up
    with the one that was stored.
    """
    path = secret_path(namespace, name)
    try:
        current: dict[str, Any] | None = await client.get(path)
    except ApiError as exc:
        if not exc.not_found:
            raise _explain(exc, namespace, name) from exc
        current = None
    if current is not None and not new:
        return ca_from_secret(current, namespace, name), False
    ca = pki.new_ca(days=days)
    data = _encode({CA_CERT: ca.cert_pem, CA_KEY: ca.key_pem})
    try:
        if current is None:
            secret = {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": name, "namespace": namespace, "labels": dict(MANAGED_BY)},
                "type": "Opaque",
                "data": data,
            }
            await client.create(secret_path(namespace), secret)
        else:
            # resourceVersion pins the replacement to the CA that was read
            current["data"] = data
            await client.replace(path, current)
    except ApiError as exc:
        if not exc.already_exists:
            raise _explain(exc, namespace, name) from exc
    else:
        return ca, True
    try:
        stored = await client.get(path)
    except ApiError as exc:
        raise _explain(exc, namespace, name) from exc
    return ca_from_secret(stored, namespace, name), False


async def store_tls(
    client: KubeClient, namespace: str, name: str, leaf: pki.KeyPair, ca: pki.KeyPair
) -> bool:
    """Create or update the kubernetes.io/tls Secret the webhook mounts; True when it was created.

    An existing Secret keeps its type and other keys (one made by hand with `kubectl create secret
    generic` works as well); only tls.crt, tls.key and ca.crt are replaced.
    """
    data = _encode({TLS_CERT: leaf.cert_pem, TLS_KEY: leaf.key_pem, CA_CERT: ca.cert_pem})
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(MANAGED_BY)},
        "type": TLS_TYPE,
        "data": data,
    }
    try:
        await client.create(secret_path(namespace), secret)
        return True
    except ApiError as exc:
        if not exc.already_exists:
            raise _explain(exc, namespace, name) from exc
    try:
        await client.patch(secret_path(namespace, name), {"data": data}, patch_type="merge")
    except ApiError as exc:
        raise _explain(exc, namespace, name) from exc
    return False
