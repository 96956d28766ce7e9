"""`module-controller certs --base-client BASEID`: client certificates for bases on the broker's
mutual-TLS listener (manifests/broker/mosquitto.conf, `use_identity_as_username`): CN = the baseID,
which the broker takes as the base's user name, so the ACL's per-base patterns apply to it.

The CA is the out-dir's ca.crt / ca.key (made when absent): give ca.crt to the broker as the
listener's `cafile`. Keep it apart from the webhook's CA (another --out-dir): a CA that signs base
identities should sign nothing else."""

from __future__ import annotations

from pathlib import Path

from certs import pki

#: Characters an MQTT user name cannot carry into an ACL pattern (mosquitto refuses + # /), and
#: the separator of a password file line.
_FORBIDDEN = "+#/: "


def check_base_id(base_id: str) -> None:
    bad = sorted({c for c in base_id if c in _FORBIDDEN})
    if not base_id or bad:
        shown = " ".join(repr(c) for c in bad) if bad else "nothing"
        raise ValueError(f"--base-client {base_id!r}: a baseID for the broker cannot be empty or hold {shown}; "
                         "use letters, digits, dots, dashes, underscores")


def issue_base_clients(ca: pki.KeyPair, base_ids: list[str], out: Path, days: int) -> list[Path]:
    """Write out/<baseID>.key and out/<baseID>.crt for each base; the certificate paths."""
    written = []
    for base_id in base_ids:
        leaf = pki.issue(ca, base_id, server=False, client=True, days=days)
        # The key first: a base that sees the new certificate finds its key already there.
        pki.write_file(out / f"{base_id}.key", leaf.key_pem, private=True)
        pki.write_file(out / f"{base_id}.crt", leaf.cert_pem)
        written.append(out / f"{base_id}.crt")
    return written
