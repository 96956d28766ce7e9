"""Kubeconfig files as users write them, and each mistake's message: file, field, fix."""

from __future__ import annotations

import base64
import ssl
from pathlib import Path

import pytest
import yaml

from certs import pki
from koupleless.kube.config import KubeConfigError, load_config, load_in_cluster

CA = pki.new_ca("test-cluster-ca")
CLIENT = pki.issue(CA, "admin", organizations=["system:masters"], server=False, client=True)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def kubeconfig(
    *,
    cluster: dict | None = None,
    user: dict | None = None,
    context: dict | None = None,
    current: str | None = "dev",
    extra_contexts: tuple[str, ...] = (),
) -> dict:
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "local", "cluster": cluster or {"server": "https://127.0.0.1:6443/", "certificate-authority-data": b64(CA.cert_pem)}}
        ],
        "users": [{"name": "admin", "user": user if user is not None else {"token": "abc123"}}],
        "contexts": [{"name": "dev", "context": context or {"cluster": "local", "user": "admin", "namespace": "team-a"}}]
        + [{"name": n, "context": {"cluster": "local", "user": "admin"}} for n in extra_contexts],
    }
    if current is not None:
        doc["current-context"] = current
    return doc


def write(path: Path, doc: dict | str) -> str:
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return str(path)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test may pick up the machine's own kubeconfig or service account."""
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def test_token_ca_data_and_namespace(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path / "kc", kubeconfig()))
    assert cfg.server == "https://127.0.0.1:6443"  # trailing slash dropped: paths are appended
    assert cfg.headers == {"Authorization": "Bearer abc123"}
    assert cfg.namespace == "team-a"
    assert cfg.ssl_context.verify_mode == ssl.CERT_REQUIRED
    assert cfg.ssl_context.check_hostname
    assert any(c["subject"] == ((("commonName", "test-cluster-ca"),),) for c in cfg.ssl_context.get_ca_certs())


def test_namespace_defaults_to_default(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path / "kc", kubeconfig(context={"cluster": "local", "user": "admin"})))
    assert cfg.namespace == "default"


def test_client_certificate_files_relative_to_the_kubeconfig(tmp_path: Path) -> None:
    (tmp_path / "pki").mkdir()
    CA.write(tmp_path / "pki" / "ca.crt", tmp_path / "pki" / "ca.key")
    CLIENT.write(tmp_path / "pki" / "admin.crt", tmp_path / "pki" / "admin.key")
    doc = kubeconfig(
        cluster={"server": "https://127.0.0.1:6443", "certificate-authority": "pki/ca.crt"},
        user={"client-certificate": "pki/admin.crt", "client-key": "pki/admin.key"},
    )
    cfg = load_config(write(tmp_path / "kc", doc))
    assert "Authorization" not in cfg.headers
    assert cfg.ssl_context.get_ca_certs()


def test_client_certificate_data(tmp_path: Path) -> None:
    doc = kubeconfig(user={"client-certificate-data": b64(CLIENT.cert_pem), "client-key-data": b64(CLIENT.key_pem)})
    cfg = load_config(write(tmp_path / "kc", doc))
    assert cfg.headers == {}


def test_insecure_skip_tls_verify(tmp_path: Path) -> None:
    doc = kubeconfig(cluster={"server": "https://10.0.0.1:6443", "insecure-skip-tls-verify": True})
    cfg = load_config(write(tmp_path / "kc", doc))
    assert cfg.ssl_context.verify_mode == ssl.CERT_NONE
    assert not cfg.ssl_context.check_hostname


def test_token_file_is_read_and_remembered(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("from-file\n")
    cfg = load_config(write(tmp_path / "kc", kubeconfig(user={"tokenFile": "token"})))
    assert cfg.headers["Authorization"] == "Bearer from-file"
    assert cfg.token_file == str(tmp_path / "token")


def test_basic_auth_and_impersonation(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path / "kc", kubeconfig(user={"username": "u", "password": "p", "as": "jane"})))
    assert cfg.headers["Authorization"] == "Basic " + b64(b"u:p")
    assert cfg.headers["Impersonate-User"] == "jane"


def test_explicit_context_overrides_current(tmp_path: Path) -> None:
    doc = kubeconfig(extra_contexts=("other",))
    cfg = load_config(write(tmp_path / "kc", doc), context="other")
    assert cfg.namespace == "default"
    assert "context other" in cfg.source


def test_kubeconfig_env_list_merges_first_file_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = kubeconfig(cluster={"server": "https://first:6443", "insecure-skip-tls-verify": True})
    second = kubeconfig(cluster={"server": "https://second:6443", "insecure-skip-tls-verify": True}, current="other",
                        extra_contexts=("other",))
    del first["current-context"]
    a, b = write(tmp_path / "a", first), write(tmp_path / "b", second)
    monkeypatch.setenv("KUBECONFIG", f"{a}:{tmp_path / 'missing'}:{b}")
    cfg = load_config()
    # current-context comes from the second file (the first sets none); the cluster from the first.
    assert cfg.server == "https://first:6443"
    assert "context other" in cfg.source


def test_home_kubeconfig_is_the_last_resort(tmp_path: Path) -> None:
    home = tmp_path / "home" / ".kube"
    home.mkdir(parents=True)
    write(home / "config", kubeconfig())
    assert load_config().namespace == "team-a"


def test_in_cluster(tmp_path: Path) -> None:
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text("sa-token")
    (sa / "ca.crt").write_bytes(CA.cert_pem)
    (sa / "namespace").write_text("koupleless-system")
    cfg = load_in_cluster(sa, {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"})
    assert cfg.server == "https://10.96.0.1:443"
    assert cfg.headers == {"Authorization": "Bearer sa-token"}
    assert cfg.namespace == "koupleless-system"
    assert cfg.token_file == str(sa / "token")


def test_in_cluster_ipv6_host_is_bracketed(tmp_path: Path) -> None:
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text("t")
    (sa / "ca.crt").write_bytes(CA.cert_pem)
    cfg = load_in_cluster(sa, {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"})
    assert cfg.server == "https://[fd00::1]:443"
    assert cfg.namespace == "default"


# --- every error names the file, the field and the fix ----------------------------------------


def error_of(path: str | None = None, context: str | None = None) -> str:
    with pytest.raises(KubeConfigError) as info:
        load_config(path, context)
    return str(info.value)


def test_unknown_context_lists_the_known_ones(tmp_path: Path) -> None:
    path = write(tmp_path / "kc", kubeconfig(extra_contexts=("prod",)))
    msg = error_of(path, "foo")
    assert msg == (
        f"kubeconfig {path}: context 'foo' not found; contexts: dev, prod — pass --context or fix current-context"
    )


def test_no_current_context(tmp_path: Path) -> None:
    path = write(tmp_path / "kc", kubeconfig(current=None))
    msg = error_of(path)
    assert path in msg and "current-context is not set" in msg and "contexts: dev" in msg and "--context" in msg


def test_missing_file(tmp_path: Path) -> None:
    msg = error_of(str(tmp_path / "nope"))
    assert f"kubeconfig {tmp_path / 'nope'}: file not found" in msg


def test_invalid_yaml(tmp_path: Path) -> None:
    msg = error_of(write(tmp_path / "kc", "clusters: [\n  - name: a\n   bad"))
    assert "not valid YAML" in msg and str(tmp_path / "kc") in msg


def test_top_level_not_a_mapping(tmp_path: Path) -> None:
    assert "expected a mapping" in error_of(write(tmp_path / "kc", "- just\n- a list\n"))


def test_context_points_at_undefined_cluster(tmp_path: Path) -> None:
    doc = kubeconfig(context={"cluster": "gone", "user": "admin"})
    msg = error_of(write(tmp_path / "kc", doc))
    assert "contexts[dev] refers to cluster 'gone'" in msg and "clusters: local" in msg


def test_context_points_at_undefined_user(tmp_path: Path) -> None:
    doc = kubeconfig(context={"cluster": "local", "user": "ghost"})
    msg = error_of(write(tmp_path / "kc", doc))
    assert "contexts[dev] refers to user 'ghost'" in msg and "users: admin" in msg


def test_server_missing(tmp_path: Path) -> None:
    path = write(tmp_path / "kc", kubeconfig(cluster={"insecure-skip-tls-verify": True}))
    msg = error_of(path)
    assert msg.startswith(f"kubeconfig {path}: clusters[local].cluster.server is empty")
    assert "https://HOST:6443" in msg


def test_server_without_scheme(tmp_path: Path) -> None:
    msg = error_of(write(tmp_path / "kc", kubeconfig(cluster={"server": "10.0.0.1:6443"})))
    assert "has no scheme — write https://10.0.0.1:6443" in msg


def test_certificate_authority_file_missing(tmp_path: Path) -> None:
    doc = kubeconfig(cluster={"server": "https://a:6443", "certificate-authority": "ca.crt"})
    msg = error_of(write(tmp_path / "kc", doc))
    assert f"clusters[local].cluster.certificate-authority: cannot read {tmp_path / 'ca.crt'}" in msg
    assert "relative to the kubeconfig's directory" in msg


def test_certificate_authority_not_pem(tmp_path: Path) -> None:
    doc = kubeconfig(cluster={"server": "https://a:6443", "certificate-authority-data": b64(b"not a cert")})
    assert "is not a PEM certificate" in error_of(write(tmp_path / "kc", doc))


def test_client_key_missing(tmp_path: Path) -> None:
    doc = kubeconfig(user={"client-certificate-data": b64(CLIENT.cert_pem)})
    msg = error_of(write(tmp_path / "kc", doc))
    assert "users[admin].user: client-key(-data) is missing" in msg


def test_client_key_does_not_match(tmp_path: Path) -> None:
    other = pki.issue(CA, "other", server=False, client=True)
    doc = kubeconfig(user={"client-certificate-data": b64(CLIENT.cert_pem), "client-key-data": b64(other.key_pem)})
    assert "cannot be loaded" in error_of(write(tmp_path / "kc", doc))


def test_exec_plugin_is_refused_with_an_alternative(tmp_path: Path) -> None:
    doc = kubeconfig(user={"exec": {"command": "aws", "apiVersion": "client.authentication.k8s.io/v1"}})
    msg = error_of(write(tmp_path / "kc", doc))
    assert "users[admin].user.exec is not supported" in msg and "kubectl create token" in msg


def test_kubeconfig_env_with_no_existing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "x"))
    msg = error_of()
    assert f"$KUBECONFIG={tmp_path / 'x'}: none of these files exists" in msg


def test_nothing_found_says_what_was_tried() -> None:
    msg = error_of()
    assert "no kubeconfig found" in msg and "--kubeconfig" in msg and ".kube/config" in msg
