"""Where to reach the API server and how to prove who we are: kubeconfig files and in-cluster config.

Lookup order (what kubectl users expect): an explicit path, then `$KUBECONFIG` (a `:`-separated list,
merged with the first file winning), then the in-cluster service account, then `~/.kube/config`.
Every mistake is reported as a `KubeConfigError` naming the file, the field and what to do about it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import ssl
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from koupleless import keys

IN_CLUSTER_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
DEFAULT_KUBECONFIG = Path("~/.kube/config")


class KubeConfigError(Exception):
    """The kubeconfig cannot be used; the message names the file, the field and the fix."""


@dataclass(frozen=True)
class KubeConfig:
    server: str
    ssl_context: ssl.SSLContext
    headers: dict[str, str]
    namespace: str = "default"
    #: A bearer-token file (tokenFile, or the in-cluster service-account token): the client re-reads it
    #: when it changes, because projected tokens are rotated under a running process.
    token_file: str | None = None
    #: Where this configuration came from, for log lines and error messages.
    source: str = ""
    #: `tls-server-name`: the name to verify in the server certificate when it differs from the URL host.
    tls_server_name: str | None = None


def load_config(kubeconfig: str | None = None, context: str | None = None) -> KubeConfig:
    """Resolve a KubeConfig the way kubectl does (see the module docstring for the order)."""
    if kubeconfig:
        return _from_files([Path(kubeconfig).expanduser()], context, explicit=True)
    env_value = os.environ.get(keys.ENV_KUBECONFIG, "")
    env_paths = [Path(p).expanduser() for p in env_value.split(os.pathsep) if p.strip()]
    if env_paths:
        existing = [p for p in env_paths if p.exists()]
        if not existing:
            raise KubeConfigError(
                f"${keys.ENV_KUBECONFIG}={env_value}: none of these files exists — "
                f"point {keys.ENV_KUBECONFIG} at a kubeconfig, or unset it to use the in-cluster config"
            )
        return _from_files(existing, context, explicit=False)
    if in_cluster_available():
        if context:
            raise KubeConfigError(
                f"--context {context!r} was given but no kubeconfig was found (running in-cluster) — "
                "pass --kubeconfig or set KUBECONFIG"
            )
        return load_in_cluster()
    home = DEFAULT_KUBECONFIG.expanduser()
    if home.exists():
        return _from_files([home], context, explicit=False)
    raise KubeConfigError(
        "no kubeconfig found: no --kubeconfig flag, $KUBECONFIG is unset, not running in a Pod "
        f"({IN_CLUSTER_DIR}/token missing) and {home} does not exist — pass --kubeconfig PATH"
    )


def in_cluster_available(directory: Path = IN_CLUSTER_DIR) -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and (directory / "token").exists()


def load_in_cluster(directory: Path = IN_CLUSTER_DIR, env: Mapping[str, str] | None = None) -> KubeConfig:
    env = os.environ if env is None else env
    host, port = env.get("KUBERNETES_SERVICE_HOST", ""), env.get("KUBERNETES_SERVICE_PORT", "443")
    where = f"in-cluster config ({directory})"
    if not host:
        raise KubeConfigError(f"{where}: KUBERNETES_SERVICE_HOST is not set — run inside a Pod or pass --kubeconfig")
    token_file = directory / "token"
    try:
        token = token_file.read_text().strip()
    except OSError as exc:
        raise KubeConfigError(f"{where}: cannot read {token_file}: {exc.strerror} — mount the service-account token") from exc
    ca_file = directory / "ca.crt"
    try:
        ctx = ssl.create_default_context(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise KubeConfigError(f"{where}: cannot load CA {ca_file}: {exc} — mount the service-account CA") from exc
    namespace = "default"
    with contextlib.suppress(OSError):
        namespace = (directory / "namespace").read_text().strip() or "default"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return KubeConfig(
        server=f"https://{host}:{port}",
        ssl_context=ctx,
        headers={"Authorization": f"Bearer {token}"},
        namespace=namespace,
        token_file=str(token_file),
        source=where,
    )


# --- kubeconfig files ---------------------------------------------------------------------------


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError as exc:
        raise KubeConfigError(f"kubeconfig {path}: file not found — pass an existing file with --kubeconfig") from exc
    except OSError as exc:
        raise KubeConfigError(f"kubeconfig {path}: cannot read: {exc.strerror}") from exc
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise KubeConfigError(f"kubeconfig {path}: not valid YAML ({exc}) — fix the syntax") from exc
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise KubeConfigError(
            f"kubeconfig {path}: top level is a {type(doc).__name__}, expected a mapping with "
            "clusters, users and contexts"
        )
    return doc


def _named_entries(doc: dict[str, Any], section: str, path: Path) -> dict[str, tuple[dict[str, Any], Path]]:
    """`clusters: [{name, cluster}]` -> {name: (cluster, file it came from)}."""
    entries = doc.get(section) or []
    if not isinstance(entries, list):
        raise KubeConfigError(f"kubeconfig {path}: {section} must be a list of {{name, ...}} entries")
    inner_key = section[:-1]  # clusters -> cluster
    out: dict[str, tuple[dict[str, Any], Path]] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise KubeConfigError(f"kubeconfig {path}: {section}[{i}] has no name — give every entry a name")
        body = entry.get(inner_key) or {}
        if not isinstance(body, dict):
            raise KubeConfigError(f"kubeconfig {path}: {section}[{i}].{inner_key} must be a mapping")
        out[entry["name"]] = (body, path)
    return out


def _from_files(paths: list[Path], context: str | None, *, explicit: bool) -> KubeConfig:
    clusters: dict[str, tuple[dict[str, Any], Path]] = {}
    users: dict[str, tuple[dict[str, Any], Path]] = {}
    contexts: dict[str, tuple[dict[str, Any], Path]] = {}
    current: str | None = None
    for path in paths:
        doc = _read_yaml(path)
        # kubectl's merge rule: the first file to define a name (or current-context) wins.
        for target, section in ((clusters, "clusters"), (users, "users"), (contexts, "contexts")):
            for name, entry in _named_entries(doc, section, path).items():
                target.setdefault(name, entry)
        if current is None and doc.get("current-context"):
            current = str(doc["current-context"])
    where = "kubeconfig " + ":".join(str(p) for p in paths)
    chosen = context or current
    if not chosen:
        names = ", ".join(sorted(contexts)) or "none"
        raise KubeConfigError(
            f"{where}: current-context is not set and no --context given; contexts: {names} — "
            "pass --context or run `kubectl config use-context NAME`"
        )
    if chosen not in contexts:
        names = ", ".join(sorted(contexts)) or "none"
        raise KubeConfigError(
            f"{where}: context {chosen!r} not found; contexts: {names} — pass --context or fix current-context"
        )
    ctx, ctx_file = contexts[chosen]
    cluster_name = ctx.get("cluster")
    if not cluster_name:
        raise KubeConfigError(f"kubeconfig {ctx_file}: contexts[{chosen}].context.cluster is empty — name a cluster")
    if cluster_name not in clusters:
        names = ", ".join(sorted(clusters)) or "none"
        raise KubeConfigError(
            f"kubeconfig {ctx_file}: contexts[{chosen}] refers to cluster {cluster_name!r}, which is not defined; "
            f"clusters: {names} — add it under clusters or fix the context"
        )
    user_name = ctx.get("user")
    if user_name and user_name not in users:
        names = ", ".join(sorted(users)) or "none"
        raise KubeConfigError(
            f"kubeconfig {ctx_file}: contexts[{chosen}] refers to user {user_name!r}, which is not defined; "
            f"users: {names} — add it under users or fix the context"
        )
    cluster, cluster_file = clusters[cluster_name]
    user, user_file = users[user_name] if user_name else ({}, ctx_file)
    return _build(
        cluster=cluster,
        cluster_where=f"kubeconfig {cluster_file}: clusters[{cluster_name}].cluster",
        cluster_dir=cluster_file.parent,
        user=user,
        user_where=f"kubeconfig {user_file}: users[{user_name}].user",
        user_dir=user_file.parent,
        namespace=str(ctx.get("namespace") or "default"),
        source=f"{where} (context {chosen})",
    )


def _resolve(path_value: str, base: Path) -> Path:
    """kubectl resolves relative paths against the directory of the file that holds them."""
    p = Path(path_value).expanduser()
    return p if p.is_absolute() else base / p


def _pem_data(value: Any, where: str, key: str) -> bytes:
    if not isinstance(value, str):
        raise KubeConfigError(f"{where}.{key} must be a base64 string")
    try:
        return base64.b64decode(value, validate=False)
    except (binascii.Error, ValueError) as exc:
        raise KubeConfigError(f"{where}.{key} is not valid base64 — paste the output of `base64 -w0 FILE`") from exc


def _read_file(path: Path, where: str, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise KubeConfigError(
            f"{where}.{key}: cannot read {path}: {exc.strerror} — fix the path (relative paths are relative "
            "to the kubeconfig's directory)"
        ) from exc


def _pem_field(section: dict[str, Any], where: str, base: Path, file_key: str) -> bytes | None:
    data_key = file_key + "-data"
    if section.get(data_key):
        return _pem_data(section[data_key], where, data_key)
    if section.get(file_key):
        return _read_file(_resolve(str(section[file_key]), base), where, file_key)
    return None


@contextlib.contextmanager
def _temp_pem_files(cert: bytes, key: bytes) -> Iterator[tuple[str, str]]:
    """`load_cert_chain` only takes paths; inline client credentials go through private temp files
    that are removed as soon as they are loaded."""
    with tempfile.TemporaryDirectory(prefix="koupleless-kubeconfig-") as d:
        cert_path, key_path = os.path.join(d, "client.crt"), os.path.join(d, "client.key")
        for path, data in ((cert_path, cert), (key_path, key)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        yield cert_path, key_path


def _build(
    *,
    cluster: dict[str, Any],
    cluster_where: str,
    cluster_dir: Path,
    user: dict[str, Any],
    user_where: str,
    user_dir: Path,
    namespace: str,
    source: str,
) -> KubeConfig:
    server = str(cluster.get("server") or "").rstrip("/")
    if not server:
        raise KubeConfigError(f"{cluster_where}.server is empty — set it to the API server URL, e.g. https://HOST:6443")
    if not server.startswith(("https://", "http://")):
        raise KubeConfigError(f"{cluster_where}.server {server!r} has no scheme — write https://{server}")

    insecure = bool(cluster.get("insecure-skip-tls-verify"))
    ca = _pem_field(cluster, cluster_where, cluster_dir, "certificate-authority")
    ctx = ssl.create_default_context()
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif ca is not None:
        try:
            ctx.load_verify_locations(cadata=ca.decode("ascii", errors="replace"))
        except ssl.SSLError as exc:
            raise KubeConfigError(
                f"{cluster_where}.certificate-authority(-data) is not a PEM certificate ({exc.reason}) — "
                "use the cluster CA in PEM form"
            ) from exc

    cert = _pem_field(user, user_where, user_dir, "client-certificate")
    key = _pem_field(user, user_where, user_dir, "client-key")
    if (cert is None) != (key is None):
        missing = "client-key" if key is None else "client-certificate"
        raise KubeConfigError(f"{user_where}: {missing}(-data) is missing — a client certificate needs both halves")
    if cert is not None and key is not None:
        try:
            with _temp_pem_files(cert, key) as (cert_path, key_path):
                ctx.load_cert_chain(cert_path, key_path)
        except ssl.SSLError as exc:
            raise KubeConfigError(
                f"{user_where}: client-certificate/client-key cannot be loaded ({exc.reason}) — "
                "they must be a matching PEM certificate and unencrypted private key"
            ) from exc

    headers: dict[str, str] = {}
    token_file: str | None = None
    if user.get("token"):
        headers["Authorization"] = f"Bearer {str(user['token']).strip()}"
    elif user.get("tokenFile"):
        path = _resolve(str(user["tokenFile"]), user_dir)
        token = _read_file(path, user_where, "tokenFile").decode().strip()
        headers["Authorization"] = f"Bearer {token}"
        token_file = str(path)
    elif user.get("username"):
        raw = f"{user['username']}:{user.get('password') or ''}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(raw).decode()
    for unsupported in ("exec", "auth-provider"):
        if user.get(unsupported) and "Authorization" not in headers and cert is None:
            raise KubeConfigError(
                f"{user_where}.{unsupported} is not supported by this client — use a token, tokenFile or "
                "client-certificate/client-key (e.g. a service-account token from `kubectl create token`)"
            )
    if user.get("as"):
        headers["Impersonate-User"] = str(user["as"])

    tls_server_name = cluster.get("tls-server-name") or None
    return KubeConfig(
        server=server,
        ssl_context=ctx,
        headers=headers,
        namespace=namespace,
        token_file=token_file,
        source=source,
        tls_server_name=str(tls_server_name) if tls_server_name else None,
    )
