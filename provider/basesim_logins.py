"""Per-base MQTT identity for base-sim: each simulated base logs in as its own baseID, with a
password (--base-password-file) or a client certificate (--base-cert-dir), as real bases do on a
broker that gives every base its own account (manifests/broker)."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

from provider.tunnel import BrokerOptions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "per-base identity",
        "one MQTT connection per base, logged in as its baseID (client id <client-id-prefix>@@@<baseID>); "
        "without these flags all bases share one connection and the --mqtt-username account",
    )
    g.add_argument("--base-password-file", metavar="FILE", default=None,
                   help="lines baseID:password, one for every base of this process")
    g.add_argument("--base-cert-dir", metavar="DIR", default=None,
                   help="DIR/<baseID>.crt and DIR/<baseID>.key for every base: client certificates (CN = baseID) "
                        "for the broker's mutual-TLS listener; give the broker's CA with --mqtt-ca")
    g.add_argument("--client-id-prefix", default="koupleless", help="MQTT client id prefix (default koupleless)")


def read_password_file(path: str) -> dict[str, str]:
    """baseID -> password from `baseID:password` lines (blank lines and # comments skipped)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"--base-password-file {path}: {exc.strerror or exc}") from exc
    out: dict[str, str] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        base_id, sep, password = line.partition(":")
        if not sep or not base_id or not password:
            raise ValueError(f"--base-password-file {path}:{n}: not a baseID:password line")
        out[base_id] = password
    return out


def logins_from_args(args: argparse.Namespace, broker: BrokerOptions,
                     base_ids: list[str]) -> dict[str, BrokerOptions] | None:
    """Each base's own broker login, or None for one shared connection."""
    if args.base_password_file and args.base_cert_dir:
        raise ValueError("--base-password-file and --base-cert-dir: give one (a base logs in one way)")
    if not (args.base_password_file or args.base_cert_dir):
        return None
    if args.mqtt_username:
        raise ValueError("--mqtt-username is the one account of a shared connection; with per-base identity each "
                         "base logs in as its own baseID: drop --mqtt-username")
    if args.base_password_file:
        passwords = read_password_file(args.base_password_file)
        missing = [b for b in base_ids if b not in passwords]
        if missing:
            raise ValueError(f"--base-password-file {args.base_password_file} has no line for base {missing[0]!r} "
                             f"({len(missing)} of {len(base_ids)} missing); add `{missing[0]}:<password>`")
        return {b: dataclasses.replace(broker, username=b, password=passwords[b]) for b in base_ids}
    logins = {}
    for b in base_ids:
        cert, key = Path(args.base_cert_dir, f"{b}.crt"), Path(args.base_cert_dir, f"{b}.key")
        for f in (cert, key):
            if not os.access(f, os.R_OK):
                raise ValueError(f"--base-cert-dir {args.base_cert_dir}: no readable {f.name} for base {b!r}; "
                                 f"issue it with `module-controller certs --base-client {b} --out-dir DIR`")
        logins[b] = dataclasses.replace(broker, username=None, password=None, cert_file=str(cert),
                                        key_file=str(key), tls=True)
    return logins
