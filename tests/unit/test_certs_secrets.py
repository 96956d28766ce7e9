"""Reading a CA back from its Secret: what a user sees when the Secret holds something else."""

from __future__ import annotations

import base64

import pytest

from certs import pki
from certs.secrets import SecretError, ca_from_secret


def encoded(**data: bytes) -> dict[str, dict[str, str]]:
    return {"data": {k.replace("_", "."): base64.b64encode(v).decode() for k, v in data.items()}}


def test_the_stored_ca_is_read_back() -> None:
    ca = pki.new_ca()
    loaded = ca_from_secret(encoded(ca_crt=ca.cert_pem, ca_key=ca.key_pem), "ns", "ca")
    assert loaded.cert == ca.cert and loaded.key_pem == ca.key_pem


def test_a_secret_without_the_key_names_what_is_missing() -> None:
    ca = pki.new_ca()
    with pytest.raises(SecretError, match=r"Secret ns/ca has no ca.key — it does not hold a CA; delete it"):
        ca_from_secret(encoded(ca_crt=ca.cert_pem), "ns", "ca")


def test_a_key_of_another_certificate_is_refused() -> None:
    ca, other = pki.new_ca(), pki.new_ca()
    with pytest.raises(SecretError, match="Secret ns/ca: the private key does not belong to the certificate"):
        ca_from_secret(encoded(ca_crt=ca.cert_pem, ca_key=other.key_pem), "ns", "ca")


def test_garbage_is_refused_with_the_fix() -> None:
    with pytest.raises(SecretError, match=r"Secret ns/ca: not a PEM certificate .* delete the Secret"):
        ca_from_secret(encoded(ca_crt=b"nope", ca_key=b"nope"), "ns", "ca")
