"""Interrupting whatever started the control plane and the broker leaves none of their processes behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from tests.helpers import wait_until

pytestmark = pytest.mark.controlplane

CHILD = """
import signal, sys, orjson
# A job started in the background by a non-interactive shell inherits SIGINT ignored, and Python
# then installs no KeyboardInterrupt handler: this child must stop on SIGINT as from a terminal.
signal.signal(signal.SIGINT, signal.default_int_handler)
from devcluster.broker import Broker
from devcluster.cluster import ControlPlane
plane, broker = ControlPlane(), Broker()
try:
    plane.start()
    broker.start()
    print(orjson.dumps({"pids": {**plane.pids, "mosquitto": broker.process.pid},
                        "dirs": [str(plane.workdir), str(broker.workdir)]}).decode(), flush=True)
    signal.pause()
finally:
    broker.stop()
    plane.stop()
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is gone for every practical purpose once reaped by init.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill-9"])
def test_interrupt_leaves_no_process_behind(sig: signal.Signals) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line, f"child failed to start the control plane: {child.stderr.read() if child.stderr else ''}"
        started = orjson.loads(line)
        pids: dict[str, int] = started["pids"]
        assert set(pids) == {"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "mosquitto"}
        assert all(_alive(p) for p in pids.values())

        child.send_signal(sig)
        child.wait(120)
        leftover = wait_until(
            lambda: not [n for n, p in pids.items() if _alive(p)] or None, timeout=30,
            what="every control-plane and broker process to exit",
        )
        assert leftover
        if sig == signal.SIGINT:  # a clean stop also removes its temp dirs
            assert not any(Path(d).exists() for d in started["dirs"])
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
