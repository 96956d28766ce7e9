"""`module-controller dev` end to end: the sample module Running, and every command it prints works as printed."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.helpers import wait_until

pytestmark = pytest.mark.controlplane

REPO = Path(__file__).resolve().parents[2]


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(int(proc.name))
    return found


def test_dev_brings_the_sample_module_to_running_and_prints_working_commands(tmp_path: Path) -> None:
    workdir = tmp_path / "dev"
    dev = subprocess.Popen(
        [sys.executable, "-m", "koupleless.cli", "dev", "--bases", "2", "--workdir", str(workdir)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    stderr_lines: list[str] = []
    threading.Thread(target=lambda: stderr_lines.extend(dev.stderr or []), daemon=True).start()
    try:
        printed: list[str] = []
        assert dev.stdout is not None
        for line in dev.stdout:
            printed.append(line.rstrip("\n"))
            if line.startswith("Logs:"):
                break
        else:
            pytest.fail(f"dev exited ({dev.wait()}) before printing its commands:\n" + "".join(stderr_lines))

        # One progress line per step, on stderr.
        steps = [line for line in stderr_lines if re.match(r"\[\d/8\]", line)]
        assert len(steps) == 8, stderr_lines

        exports = [line.strip().split("   #")[0] for line in printed if line.strip().startswith("export ")]
        commands = [line.strip() for line in printed if line.strip().startswith("kubectl get")]
        assert any(e.startswith("export KUBECONFIG=") for e in exports)
        assert any("status.podIP=" in c for c in commands)
        assert any("spec.nodeName=virtual-node-" in c for c in commands)
        assert not any("<" in c for c in commands), "every value is filled in"

        env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
        for command in commands:
            script = "; ".join([*exports, command])
            out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, (command, out.stderr)
            assert "test-module-deployment" in out.stdout, (command, out.stdout)
            if "pod" in command:
                assert "Running" in out.stdout, (command, out.stdout)
    finally:
        dev.send_signal(signal.SIGINT)
        try:
            dev.wait(90)
        finally:
            if dev.poll() is None:
                dev.kill()
    assert dev.returncode == 0, "".join(stderr_lines[-30:])
    wait_until(lambda: not _processes_mentioning(str(workdir)), timeout=30,
               what="every process dev started to exit")
    # A --workdir the user named is kept, with the logs of the run.
    assert (workdir / "logs" / "provider.log").exists()
