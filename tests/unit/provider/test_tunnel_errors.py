"""What a user reads when the broker will not have us: the flag to fix is named."""

from __future__ import annotations

import argparse
import ssl
from pathlib import Path

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from certs import pki
from provider.tunnel import (
    BrokerOptions,
    add_broker_arguments,
    broker_from_args,
    connect_error_message,
    refusal_message,
)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_broker_arguments(parser)
    return parser.parse_args(["--mqtt-broker", "127.0.0.1:8883", *argv])


def test_bad_credentials_name_the_user_and_the_flags() -> None:
    broker = BrokerOptions("127.0.0.1", 1883, username="alice", password="x")
    msg = refusal_message(broker, "koupleless@@@p", ReasonCode(PacketTypes.CONNACK, identifier=134))
    assert "Bad user name or password" in msg and "'alice'" in msg and "--mqtt-password-file" in msg


def test_missing_credentials_say_which_flags_to_set() -> None:
    msg = refusal_message(BrokerOptions("h"), "c", ReasonCode(PacketTypes.CONNACK, identifier=135))
    assert "set --mqtt-username and --mqtt-password-file" in msg


def test_other_refusals_are_passed_through_without_blaming_credentials() -> None:
    msg = refusal_message(BrokerOptions("h"), "c", ReasonCode(PacketTypes.CONNACK, identifier=133))
    assert "Client identifier not valid" in msg and "--mqtt-username" not in msg


def test_untrusted_certificate_names_the_ca_flag() -> None:
    exc = ssl.SSLCertVerificationError(1, "certificate verify failed")
    exc.verify_message = "unable to get local issuer certificate"
    msg = connect_error_message(BrokerOptions("h", ca_file="/etc/ca.pem"), exc)
    assert "TLS certificate not trusted (unable to get local issuer certificate)" in msg
    assert "--mqtt-ca (/etc/ca.pem)" in msg
    assert "pass the CA" in connect_error_message(BrokerOptions("h", tls=True), exc)


def test_refused_connection_names_the_address_flag() -> None:
    assert "--mqtt-broker h:1" in connect_error_message(BrokerOptions("h", 1), ConnectionRefusedError())


def test_password_from_file_or_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    assert broker_from_args(parse("--mqtt-username", "u", "--mqtt-password-file", str(secret))).password == "s3cret"
    monkeypatch.setenv("MQTT_PASSWORD", "from-env")
    assert broker_from_args(parse("--mqtt-username", "u")).password == "from-env"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (("--mqtt-password-file", "/nonexistent/pw"), "--mqtt-password-file /nonexistent/pw: No such file"),
        (("--mqtt-ca", "/nonexistent/ca"), "--mqtt-ca /nonexistent/ca: no such readable file"),
        (("--mqtt-cert", "/etc/hostname"), "--mqtt-cert and --mqtt-key go together"),
    ],
)
def test_unusable_files_are_refused_naming_the_flag(argv: tuple[str, ...], expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        broker_from_args(parse(*argv))


def test_ca_file_that_is_not_pem_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_text("hello\n")
    with pytest.raises(ValueError, match="not a PEM CA bundle"):
        broker_from_args(parse("--mqtt-ca", str(junk)))
    ca = pki.new_ca("ok", days=1)
    good = tmp_path / "ca.crt"
    pki.write_file(good, ca.cert_pem)
    assert broker_from_args(parse("--mqtt-ca", str(good))).ca_file == str(good)
