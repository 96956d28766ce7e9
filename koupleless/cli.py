"""`module-controller`: one console script, one subcommand per component.

Each subcommand lives in its own package (`webhook.cli`, `provider.cli`, ...) exposing
`add_arguments(parser)` and `run(args) -> int`; only the chosen one is imported, so `--help` is fast
and a broken component cannot break the others.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

from koupleless import __version__

#: name -> (module implementing it, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "webhook": ("webhook.cli", "mutating admission webhook: validate and default module Pods"),
    "extender": ("extender.cli", "kube-scheduler extender: place modules only on bases that fit"),
    "provider": ("provider.cli", "virtual-node provider: bases become Nodes, module Pods become MQTT installs"),
    "certs": ("certs.cli", "write a CA and serving certificates; inject the CA bundle into the webhook config"),
    "base-sim": ("provider.basesim_cli", "simulated Koupleless bases speaking the arklet MQTT protocol"),
    "dev": ("devcluster.cli", "run the whole system locally: control plane, broker, components, bases"),
    "status": ("provider.status_cli", "table of bases and the modules on each"),
}


def _load(module_path: str) -> ModuleType | None:
    try:
        return importlib.import_module(module_path)
    except ModuleNotFoundError as exc:
        if exc.name and module_path.startswith(exc.name):
            return None
        raise


def _not_implemented(name: str) -> Callable[[argparse.Namespace], int]:
    def run(_: argparse.Namespace) -> int:
        print(f"module-controller {name}: not implemented yet", file=sys.stderr)
        return 2

    return run


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="module-controller",
        description="Koupleless ModuleController V2: release modules to SOFAArk bases with plain kubectl.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_path, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name != chosen:
            continue
        module = _load(module_path)
        if module is None:
            p.set_defaults(run=_not_implemented(name), accepts_any=True)
        else:
            module.add_arguments(p)
            p.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(args_list)
    args, unknown = parser.parse_known_args(args_list)
    if unknown and not getattr(args, "accepts_any", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
