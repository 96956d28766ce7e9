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
