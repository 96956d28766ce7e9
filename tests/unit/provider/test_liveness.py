"""Liveness with the shipped defaults, on a fake clock: heartbeats that are merely late never make a
Node NotReady, and a base that really fell silent is NotReady within the documented bound
(README, "A base that dies": --missed-heartbeats x the heartbeat interval, plus one judge period)."""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest

from koupleless import arklet
from provider.bases import BaseRegistry, judge_period
from provider.controller import ProviderOptions
from provider.state import TUNNEL_HTTP, TUNNEL_MQTT

ENV = "dev"
DEFAULTS = ProviderOptions()
#: Each beat up to this far off its fixed-rate slot, either way (network or GC delay).
JITTER_S = 3.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Listener:
    def __getattr__(self, _name: str) -> Any:
        return lambda *_a, **_k: None


def registry_on(clock: Clock) -> BaseRegistry:
    registry = BaseRegistry(ENV, Listener(), heartbeat_interval=DEFAULTS.heartbeat_interval,
                            missed_heartbeats=DEFAULTS.missed_heartbeats, gone_after=DEFAULTS.gone_after, clock=clock)
    registry.http_heartbeat_interval = DEFAULTS.http_heartbeat_interval
    registry.connection_changed(True)
    registry.http_hearing_since = clock()
    return registry


def interval_of(tunnel: str) -> float:
    return DEFAULTS.http_heartbeat_interval if tunnel == TUNNEL_HTTP else DEFAULTS.heartbeat_interval


def beat(registry: BaseRegistry, tunnel: str, base_id: str, ts_ms: int) -> None:
    """One ACTIVATED heartbeat of `base_id`, through the registry's door for that tunnel."""
    data = {"baseMetadata": {"identity": base_id, "name": "base", "version": "1.1.1", "clusterName": "base"},
            "localIP": "10.0.0.1", "localHostName": base_id, "port": 1238, "state": arklet.ACTIVATED}
    if tunnel == TUNNEL_HTTP:
        registry.receive(arklet.HEART, data, ts_ms, tunnel=TUNNEL_HTTP)
    else:
        registry.handle(arklet.topic(ENV, base_id, arklet.HEART), arklet.encode_envelope(data, ts_ms))


@pytest.mark.parametrize("tunnel", [TUNNEL_MQTT, TUNNEL_HTTP])
def test_heartbeats_jittered_by_3s_never_make_a_node_not_ready(tunnel: str) -> None:
    """50 bases for 10 minutes, each beat up to 3 s early or late off its slot; base 0 alternates
    3 s late and 3 s early, the longest gap jitter can make (interval + 6 s), every other beat.
    Judged every 0.1 s, far more often than the provider does."""
    clock = Clock()
    registry = registry_on(clock)
    interval = interval_of(tunnel)
    rng = random.Random(14)
    start, ts0 = clock.now, arklet.now_ms() - 700_000
    beats: list[tuple[float, str]] = []
    for n in range(50):
        base_id = f"b-{n}"
        for k in range(int(600 / interval)):
            slot = start + JITTER_S + n * interval / 50 + k * interval
            off = (JITTER_S if k % 2 else -JITTER_S) if n == 0 else rng.uniform(-JITTER_S, JITTER_S)
            beats.append((slot + off, base_id))
    beats.sort()
    longest = max(b - a for a, b in itertools.pairwise(t for t, who in beats if who == "b-0"))
    assert longest == pytest.approx(interval + 2 * JITTER_S)

    i, not_ready = 0, []
    while clock.now < start + 600:
        clock.now = round(clock.now + 0.1, 6)
        while i < len(beats) and beats[i][0] <= clock.now:
            at, base_id = beats[i]
            beat(registry, tunnel, base_id, ts0 + int((at - start) * 1000))
            i += 1
        registry.judge()
        not_ready += [(round(clock.now - start, 1), b.base_id) for b in registry.bases.values() if not b.ready]
    assert len(registry.bases) == 50
    assert not_ready == []


@pytest.mark.parametrize("tunnel", [TUNNEL_MQTT, TUNNEL_HTTP])
@pytest.mark.parametrize("phase", [0.0, 0.37, 0.99])
def test_a_base_silent_after_a_heartbeat_is_not_ready_within_one_judge_period_of_the_bound(
    tunnel: str, phase: float
) -> None:
    """Judged as the provider's liveness loop does (every judge period, from any phase): NotReady
    after missed-heartbeats x interval of silence, never before, and at most one judge period later."""
    clock = Clock()
    registry = registry_on(clock)
    interval = interval_of(tunnel)
    period = judge_period(DEFAULTS.heartbeat_interval)
    bound = DEFAULTS.missed_heartbeats * interval
    start, ts0 = clock.now, arklet.now_ms() - 700_000
    last = start
    for k in range(3):  # a healthy base first: three beats on time
        clock.now = last = start + k * interval
        beat(registry, tunnel, "victim", ts0 + k * int(interval * 1000))
    [base] = registry.bases.values()
    assert base.ready
    # killed right after its last heartbeat: silence from `last` on
    clock.now = last + phase * period
    while base.ready and clock.now < last + 10 * bound:
        registry.judge()
        if base.ready:
            clock.now = round(clock.now + period, 6)
    silent = clock.now - last
    assert bound < silent <= bound + period, f"NotReady after {silent:.2f}s of silence"
    assert base.not_ready_reason == "BaseHeartbeatMissed"


def test_a_new_base_logs_one_line_and_a_base_back_from_silence_says_it_is_ready(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A fleet registering at once logs one registry line per base (not "new" and "ready" both);
    a base that went NotReady and heartbeats again says it is ready."""
    clock = Clock()
    registry = registry_on(clock)
    ts0 = arklet.now_ms() - 700_000
    with caplog.at_level("INFO", logger="provider.bases"):
        beat(registry, TUNNEL_MQTT, "b-1", ts0)
        beat(registry, TUNNEL_MQTT, "b-1", ts0 + 10_000)
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == ["new base 'b-1'"]
    [base] = registry.bases.values()
    clock.now += 10 * DEFAULTS.heartbeat_interval
    registry.judge()
    assert not base.ready
    caplog.clear()
    with caplog.at_level("INFO", logger="provider.bases"):
        beat(registry, TUNNEL_MQTT, "b-1", ts0 + 120_000)
    assert "base b-1 is ready" in [r.getMessage() for r in caplog.records]
