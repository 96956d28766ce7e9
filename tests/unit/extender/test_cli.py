"""`module-controller extender` refuses a configuration it cannot serve, and says what to change."""

from __future__ import annotations

from pathlib import Path

import pytest

from koupleless.cli import main


def test_tls_needs_both_files(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["extender", "--port", "0", "--tls-cert-file", str(tmp_path / "c.pem")]) == 2
    assert "--tls-private-key-file" in capsys.readouterr().err


def test_an_explicit_kubeconfig_that_does_not_work_is_an_error(capsys: pytest.CaptureFixture[str],
                                                               tmp_path: Path) -> None:
    missing = tmp_path / "nope.kubeconfig"
    assert main(["extender", "--port", "0", "--kubeconfig", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err


def test_unreadable_certificate_is_reported(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("not a certificate")
    key.write_text("not a key")
    assert main(["extender", "--no-kube", "--tls-cert-file", str(cert), "--tls-private-key-file", str(key)]) == 1
    assert "module-controller certs" in capsys.readouterr().err


def test_help_lists_the_modes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["extender", "--help"])
    out = capsys.readouterr().out
    for flag in ("--kubeconfig", "--no-kube", "--strategy", "--tls-cert-file", "--burst-wait"):
        assert flag in out


def test_leader_election_needs_the_api_server(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["extender", "--no-kube", "--port", "0", "--leader-elect"]) == 2
    assert "--leader-elect needs the API server" in capsys.readouterr().err


def test_leader_election_durations_that_allow_two_leaders_are_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: k, cluster: {server: 'https://127.0.0.1:1'}}]\n"
        "users: [{name: u, user: {token: t}}]\n"
        "contexts: [{name: c, context: {cluster: k, user: u}}]\n"
    )
    assert main(["extender", "--port", "0", "--kubeconfig", str(kubeconfig), "--leader-elect",
                 "--leader-lease-duration", "5", "--leader-renew-deadline", "5"]) == 2
    err = capsys.readouterr().err
    assert "--leader-lease-duration (5s) must be longer than --leader-renew-deadline (5s)" in err


def test_the_leader_labels_the_pod_the_downward_api_names(monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    from extender.cli import _leader_pod
    from koupleless.kube.leaderelection import LeaderElectionConfig

    election = LeaderElectionConfig(namespace="lease-ns", name="l", identity="a")
    monkeypatch.setenv("POD_NAME", "extender-7d9-x2")
    monkeypatch.setenv("POD_NAMESPACE", "module-controller")
    assert _leader_pod(election) == ("module-controller", "extender-7d9-x2")
    monkeypatch.delenv("POD_NAMESPACE")
    assert _leader_pod(election) == ("lease-ns", "extender-7d9-x2")
    assert _leader_pod(None) is None  # no --leader-elect: nothing is labelled
    monkeypatch.delenv("POD_NAME")
    assert _leader_pod(election) is None
    assert "Service selecting that label has no endpoints" in caplog.text
