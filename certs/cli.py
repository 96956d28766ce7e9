"""`module-controller certs`: write ca.crt, tls.crt and tls.key for the webhook, and optionally put
the CA bundle into its MutatingWebhookConfiguration (a manifest file, or the live object).

Running it again over the same directory keeps the CA (ca.crt + ca.key) and re-issues the serving
certificate, so a running webhook picks up the new pair and the apiserver keeps trusting it.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import sys
from pathlib import Path

from certs import pki
from certs.inject import InjectError, inject_live, inject_manifest
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
        "--kubeconfig", help="kubeconfig for --inject-live (default: $KUBECONFIG, in-cluster, ~/.kube)"
    )
    parser.add_argument("--context", help="kubeconfig context for --inject-live")


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
    except (InjectError, KubeConfigError, ValueError, OSError) as exc:
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
    dns_names = list(args.dns_name)
    if args.service or not (args.dns_name or args.ip):
        dns_names += service_names(args.service or DEFAULT_NAME, args.namespace)
    out = Path(args.out_dir)
    ca, made = load_or_make_ca(out, args.ca_days, new=args.new_ca)
    common_name = dns_names[0] if dns_names else args.ip[0]
    leaf = pki.issue(ca, common_name, dns_names=dns_names, ips=args.ip, days=args.days)
    # tls.key before tls.crt: a watcher that sees the new certificate finds its key already there.
    pki.write_file(out / TLS_KEY, leaf.key_pem, private=True)
    pki.write_file(out / TLS_CERT, leaf.cert_pem)
    print(f"{'new' if made else 'kept'} CA {out / CA_CERT}")
    print(f"serving certificate {out / TLS_CERT} for {', '.join([*dns_names, *args.ip])}, {args.days} days")
    if args.inject_manifest:
        count = inject_manifest(args.inject_manifest, ca.cert_pem)
        print(f"CA bundle written into {count} webhook(s) in {args.inject_manifest}")
    if args.inject_live:
        count = asyncio.run(_inject_live(args, ca.cert_pem))
        print(f"CA bundle patched into {count} webhook(s) of MutatingWebhookConfiguration {args.inject_live}")
    return 0


def load_or_make_ca(out: Path, days: int, *, new: bool = False) -> tuple[pki.KeyPair, bool]:
    """The CA in `out`, or a new one written there; True when it is new."""
    cert, key = out / CA_CERT, out / CA_KEY
    if not new and cert.exists() and key.exists():
        return pki.load(cert, key), False
    ca = pki.new_ca(days=days)
    ca.write(cert, key)
    return ca, True


async def _inject_live(args: argparse.Namespace, ca_pem: bytes) -> int:
    async with KubeClient.from_kubeconfig(args.kubeconfig, args.context) as client:
        try:
            return await inject_live(client, args.inject_live, ca_pem)
        except ApiError as exc:
            raise InjectError(f"MutatingWebhookConfiguration {args.inject_live}: {exc}") from exc
