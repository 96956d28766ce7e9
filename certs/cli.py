"""`module-controller certs`: write ca.crt, tls.crt and tls.key for the webhook, and optionally put
the CA bundle into its MutatingWebhookConfiguration (a manifest file, or the live object). With
--base-client: client certificates for bases on the MQTT broker instead (certs/base_client.py).

Running it again over the same directory keeps the CA (ca.crt + ca.key) and re-issues the serving
certificate, so a running webhook picks up the new pair and the apiserver keeps trusting it.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import sys
from pathlib import Path

from certs import base_client, pki, secrets
from certs.inject import InjectError, inject_live, inject_manifest
from certs.secrets import SecretError
from koupleless.kube.client import ApiError, KubeClient
from koupleless.kube.config import KubeConfigError
from webhook.registration import DEFAULT_NAME, DEFAULT_NAMESPACE

CA_CERT, CA_KEY, TLS_CERT, TLS_KEY = "ca.crt", "ca.key", "tls.crt", "tls.key"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out-dir", default=".", help="where to write ca.crt, ca.key, tls.crt, tls.key")
    parser.add_argument(
        "--dns-name",
        action="append",
        default=[],
        metavar="NAME",
        help="a DNS name of the webhook (repeatable)",
    )
    parser.add_argument(
        "--ip",
        action="append",
        default=[],
        metavar="ADDRESS",
        help="an IP address of the webhook (repeatable)",
    )
    parser.add_argument(
        "--service",
        help=f"add the in-cluster names of this Service: <service>.<namespace>.svc and friends "
        f"(default, when no --dns-name or --ip: {DEFAULT_NAME})",
    )
    parser.add_argument(
        "--namespace", default=DEFAULT_NAMESPACE, help="the Service's namespace (default %(default)s)"
    )
    parser.add_argument("--days", type=int, default=365, help="serving certificate validity (default 365)")
    parser.add_argument(
        "--ca-days", type=int, default=3650, help="CA validity when a new CA is made (default 3650)"
    )
    parser.add_argument(
        "--new-ca", action="store_true", help="make a new CA even when the out-dir already holds one"
    )
    parser.add_argument(
        "--inject-manifest",
        metavar="FILE",
        help="write the CA bundle into the MutatingWebhookConfiguration(s) in this YAML file, in place",
    )
    parser.add_argument(
        "--inject-live",
        metavar="NAME",
        nargs="?",
        const=DEFAULT_NAME,
        help=f"patch the CA bundle into the live MutatingWebhookConfiguration NAME (default {DEFAULT_NAME})",
    )
    parser.add_argument(
        "--ca-secret",
        metavar="NAME",
        help="keep the CA in this Secret of --namespace (keys ca.crt, ca.key): loaded when it exists, "
        "else a new CA is made and the Secret created; the CA in --out-dir is then not used",
    )
    parser.add_argument(
        "--tls-secret",
        metavar="NAME",
        help="create or update this kubernetes.io/tls Secret of --namespace with tls.crt, tls.key and "
        "ca.crt (the one the webhook Deployment mounts)",
    )
    parser.add_argument(
        "--base-client",
        action="append",
        default=[],
        metavar="BASEID",
        help="instead of the webhook's certificate: a client certificate for this base on the MQTT broker's "
        "mutual-TLS listener (CN = BASEID), written as <out-dir>/BASEID.crt and .key and signed by the "
        "out-dir's CA (repeatable; base-sim --base-cert-dir reads that layout)",
    )
    parser.add_argument(
        "--kubeconfig",
        help="kubeconfig for --ca-secret, --tls-secret and --inject-live "
        "(default: $KUBECONFIG, in-cluster, ~/.kube)",
    )
    parser.add_argument(
        "--context", help="kubeconfig context for --ca-secret, --tls-secret and --inject-live"
    )


def service_names(service: str, namespace: str) -> list[str]:
    return [
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}.svc.cluster.local",
        f"{service}.{namespace}",
        service,
    ]


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (InjectError, SecretError, ApiError, KubeConfigError, ValueError, OSError) as exc:
        print(f"module-controller certs: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    if args.days <= 0 or args.ca_days <= 0:
        raise ValueError("--days and --ca-days must be positive")
    for ip in args.ip:
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise ValueError(f"--ip {ip!r} is not an IP address; put host names in --dns-name") from None
    if args.base_client:
        return _run_base_clients(args)
    dns_names = list(args.dns_name)
    if args.service or not (args.dns_name or args.ip):
        dns_names += service_names(args.service or DEFAULT_NAME, args.namespace)
    out = Path(args.out_dir)
    if args.ca_secret or args.tls_secret or args.inject_live:
        return asyncio.run(_run_against_cluster(args, dns_names, out))
    ca, made = load_or_make_ca(out, args.ca_days, new=args.new_ca)
    print(f"{'new' if made else 'kept'} CA {out / CA_CERT}")
    _write_leaf(args, ca, dns_names, out)
    if args.inject_manifest:
        _inject_manifest(args, ca)
    return 0


def _run_base_clients(args: argparse.Namespace) -> int:
    webhook_flags = [f for f, v in (("--dns-name", args.dns_name), ("--ip", args.ip), ("--service", args.service),
                                    ("--inject-manifest", args.inject_manifest), ("--inject-live", args.inject_live),
                                    ("--ca-secret", args.ca_secret), ("--tls-secret", args.tls_secret)) if v]
    if webhook_flags:
        raise ValueError(f"--base-client issues base certificates only; {', '.join(webhook_flags)} belong to the "
                         "webhook's certificate: run them separately, with another --out-dir")
    for base_id in args.base_client:
        base_client.check_base_id(base_id)
    out = Path(args.out_dir)
    ca, made = load_or_make_ca(out, args.ca_days, new=args.new_ca)
    print(f"{'new' if made else 'kept'} CA {out / CA_CERT} (the broker's cafile for base certificates)")
    for cert in base_client.issue_base_clients(ca, args.base_client, out, args.days):
        print(f"base client certificate {cert} (CN {cert.stem}), key {cert.with_suffix('.key')}, {args.days} days")
    return 0


async def _run_against_cluster(args: argparse.Namespace, dns_names: list[str], out: Path) -> int:
    # Order matters for a run that fails half way: the CA is stored before anything is signed with
    # it, and the webhook's Secret is updated before the apiserver is told to trust its CA.
    async with KubeClient.from_kubeconfig(args.kubeconfig, args.context) as client:
        if args.ca_secret:
            where = f"Secret {args.namespace}/{args.ca_secret}"
            ca, made = await secrets.load_or_create_ca(
                client, args.namespace, args.ca_secret, args.ca_days, new=args.new_ca
            )
            ca.write(out / CA_CERT, out / CA_KEY)
            print(f"{'new CA stored in' if made else 'kept CA from'} {where}")
        else:
            ca, made = load_or_make_ca(out, args.ca_days, new=args.new_ca)
            print(f"{'new' if made else 'kept'} CA {out / CA_CERT}")
        leaf = _write_leaf(args, ca, dns_names, out)
        if args.tls_secret:
            created = await secrets.store_tls(client, args.namespace, args.tls_secret, leaf, ca)
            print(
                f"serving pair {'stored in new' if created else 'updated in'} Secret {args.namespace}/{args.tls_secret}"
            )
        if args.inject_manifest:
            _inject_manifest(args, ca)
        if args.inject_live:
            try:
                count = await inject_live(client, args.inject_live, ca.cert_pem)
            except ApiError as exc:
                raise InjectError(f"MutatingWebhookConfiguration {args.inject_live}: {exc}") from exc
            print(
                f"CA bundle patched into {count} webhook(s) of MutatingWebhookConfiguration {args.inject_live}"
            )
    return 0


def _write_leaf(args: argparse.Namespace, ca: pki.KeyPair, dns_names: list[str], out: Path) -> pki.KeyPair:
    common_name = dns_names[0] if dns_names else args.ip[0]
    leaf = pki.issue(ca, common_name, dns_names=dns_names, ips=args.ip, days=args.days)
    # tls.key before tls.crt: a watcher that sees the new certificate finds its key already there.
    pki.write_file(out / TLS_KEY, leaf.key_pem, private=True)
    pki.write_file(out / TLS_CERT, leaf.cert_pem)
    print(f"serving certificate {out / TLS_CERT} for {', '.join([*dns_names, *args.ip])}, {args.days} days")
    return leaf


def _inject_manifest(args: argparse.Namespace, ca: pki.KeyPair) -> None:
    count = inject_manifest(args.inject_manifest, ca.cert_pem)
    print(f"CA bundle written into {count} webhook(s) in {args.inject_manifest}")


def load_or_make_ca(out: Path, days: int, *, new: bool = False) -> tuple[pki.KeyPair, bool]:
    """The CA in `out`, or a new one written there; True when it is new."""
    cert, key = out / CA_CERT, out / CA_KEY
    if not new and cert.exists() and key.exists():
        return pki.load(cert, key), False
    ca = pki.new_ca(days=days)
    ca.write(cert, key)
    return ca, True
