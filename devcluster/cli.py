"""`module-controller dev`: the whole system locally, the sample module Running, and how to use it."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from devcluster.binaries import BinariesError
from devcluster.processes import StartError
from devcluster.stack import DevStack, StackOptions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bases", type=int, default=3, help="simulated bases to start (default %(default)s)")
    parser.add_argument("--env", default="dev", help="MQTT topic env of provider and bases (default %(default)s)")
    parser.add_argument("--base-name", default="base", help="base name label (default %(default)s)")
    parser.add_argument("--base-version", default="1.1.1", help="base version label (default %(default)s)")
    parser.add_argument("--max-modules", type=int, default=10, help="modules per base (default %(default)s)")
    parser.add_argument("--no-sample", action="store_true", help="do not apply the seed's sample Deployment")
    parser.add_argument("--workdir", type=Path, default=None, help="where kubeconfig, certs and logs go; "
                        "kept on exit (default: a new temp dir, removed on exit)")


def run(args: argparse.Namespace) -> int:
    if args.bases < 1:
        print("module-controller dev: --bases must be at least 1", file=sys.stderr)
        return 2
    stack = DevStack(StackOptions(bases=args.bases, env=args.env, base_name=args.base_name,
                                  base_version=args.base_version, max_modules=args.max_modules,
                                  apply_sample=not args.no_sample, workdir=args.workdir))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        # Signals during start-up interrupt it the ordinary way; afterwards they only set `stop`.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        stack.start()
        signal.signal(signal.SIGINT, lambda *_: stop.set())
    except (StartError, BinariesError) as exc:
        print(f"module-controller dev: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("module-controller dev: interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    try:
        if args.no_sample:
            print(f"\nReady. export KUBECONFIG={stack.plane.kubeconfig}\nStop: Ctrl-C", flush=True)
        else:
            print(stack.usage(stack.wait_sample_running()), flush=True)
        stop.wait()
        print("module-controller dev: stopping...", file=sys.stderr, flush=True)
    finally:
        stack.stop()
    return 0
