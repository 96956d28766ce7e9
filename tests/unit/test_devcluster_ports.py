"""Ports for the servers the rig starts: never an ephemeral port (an outgoing connection may take it
before the server binds), never one another run on this machine was just given."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from devcluster import processes


@pytest.fixture
def reservations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(processes, "_RESERVATIONS", tmp_path / "ports")
    return tmp_path / "ports"


def test_ports_are_below_the_ephemeral_range_and_never_handed_out_twice(reservations: Path) -> None:
    ports = [processes.free_port() for _ in range(300)]
    assert len(set(ports)) == 300
    assert max(ports) < processes._ephemeral_low()
    # (a reserved port found in use, by a server of another run say, is skipped and stays reserved)
    assert set(ports) <= {int(p.name) for p in reservations.iterdir()}


def test_a_port_another_run_reserved_is_skipped_until_its_reservation_is_stale(
        reservations: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reservations.mkdir()
    (reservations / "20001").touch()
    picks = iter([20001, 20002])
    monkeypatch.setattr(processes._random, "randint", lambda _a, _b: next(picks))
    assert processes.free_port() == 20002

    old = time.time() - processes._RESERVATION_TTL_S - 1
    os.utime(reservations / "20001", (old, old))
    monkeypatch.setattr(processes._random, "randint", lambda _a, _b: 20001)
    assert processes.free_port() == 20001
