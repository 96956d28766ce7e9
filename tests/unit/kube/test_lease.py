"""Leases: expiry by observed silence on our own clock (client-go's rule), never by the holder's
renewTime against our clock; and the bodies and records both leader election and Node Leases write."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from koupleless.kube.lease import LeaseObserver, LeaseRecord, lease_body, micro_time, parse_micro_time

T0 = dt.datetime(2025, 3, 1, 12, 0, 0, tzinfo=dt.UTC)


class Clocks:
    """Our monotonic and wall clocks, moved by hand."""

    def __init__(self) -> None:
        self.elapsed = 0.0

    def monotonic(self) -> float:
        return 1000.0 + self.elapsed

    def wall(self) -> dt.datetime:
        return T0 + dt.timedelta(seconds=self.elapsed)

    def advance(self, seconds: float) -> None:
        self.elapsed += seconds


class Holder:
    """Another replica renewing a Lease; its clock is `skew` seconds off ours."""

    def __init__(self, clocks: Clocks, skew: float, duration: int = 10, name: str = "other") -> None:
        self.clocks, self.skew, self.name = clocks, skew, name
        self.rv = 0
        self.lease = lease_body("node-a", "kube-node-lease", name, duration)
        self.renew()

    def renew(self) -> dict[str, Any]:
        self.rv += 1
        now = micro_time(self.clocks.wall() + dt.timedelta(seconds=self.skew))
        record = LeaseRecord.from_lease(self.lease).renewed_by(self.name, LeaseRecord.from_lease(self.lease).duration,
                                                               now=now)
        self.lease = {**self.lease, "metadata": {**self.lease["metadata"], "resourceVersion": str(self.rv)},
                      "spec": record.to_spec()}
        return self.lease


def observer(clocks: Clocks, **kwargs: Any) -> LeaseObserver:
    return LeaseObserver(clock=clocks.monotonic, wall_clock=clocks.wall, **kwargs)


def renew_time_left(lease: dict[str, Any], now: dt.datetime) -> float:
    """The judgement this module replaces: the holder's renewTime against our wall clock."""
    record = LeaseRecord.from_lease(lease)
    renewed = parse_micro_time(record.renew_time)
    assert renewed is not None
    return (renewed + dt.timedelta(seconds=record.duration) - now).total_seconds()


def test_a_holder_whose_clock_is_behind_but_renews_is_not_expired() -> None:
    clocks = Clocks()
    holder = Holder(clocks, skew=-30.0, duration=10)
    seen = observer(clocks)
    for _ in range(20):  # 40 s of renewals every 2 s, read by us after each one
        clocks.advance(2.0)
        lease = holder.renew()
        assert renew_time_left(lease, clocks.wall()) < 0  # by its renewTime it looks 20 s dead
        assert not seen.expired("kube-node-lease/node-a", lease)
        assert seen.seconds_left("kube-node-lease/node-a", lease) == pytest.approx(10.0)


def test_a_holder_that_stops_renewing_expires_after_the_duration_of_observed_silence() -> None:
    clocks = Clocks()
    holder = Holder(clocks, skew=+30.0, duration=10)  # ahead: by renewTime it would look alive for 40 s
    seen = observer(clocks)
    key = "kube-node-lease/node-a"
    lease = holder.renew()
    assert not seen.expired(key, lease)
    clocks.advance(9.9)
    assert not seen.expired(key, lease)
    assert seen.seconds_left(key, lease) == pytest.approx(0.1)
    clocks.advance(0.1)
    assert seen.expired(key, lease)
    assert renew_time_left(lease, clocks.wall()) > 0  # its own timestamp still claims 30 s more
    lease = holder.renew()  # it comes back: a change, so the silence starts over
    assert not seen.expired(key, lease)


def test_a_lease_first_seen_counts_as_just_changed() -> None:
    """A candidate that has just started cannot know when the Lease last changed: it waits a whole
    duration, however old renewTime looks (the holder's clock may be far behind)."""
    clocks = Clocks()
    holder = Holder(clocks, skew=-3600.0, duration=10)
    seen = observer(clocks)
    assert not seen.expired("k", holder.lease)
    clocks.advance(10)
    assert seen.expired("k", holder.lease)


def test_trusting_a_bound_on_clock_skew_takes_over_a_long_dead_lease_at_once() -> None:
    clocks = Clocks()
    holder = Holder(clocks, skew=0.0, duration=10)
    clocks.advance(3600)  # the holder died an hour ago; we only start now
    seen = observer(clocks, max_clock_skew=5.0)
    assert seen.expired("k", holder.lease)
    behind = Holder(clocks, skew=-8.0, duration=10)  # alive; its clock 8 s behind (more than we trust)
    assert not seen.expired("k2", behind.lease)
    assert seen.seconds_left("k2", behind.lease) == pytest.approx(10 - 8 + 5)  # sooner than a whole duration
    ahead = Holder(clocks, skew=+60.0, duration=10)  # a clock ahead never makes the wait longer
    assert seen.seconds_left("k3", ahead.lease) == pytest.approx(10)


def test_any_write_counts_as_a_change_and_an_identical_read_does_not() -> None:
    clocks = Clocks()
    seen = observer(clocks)
    lease = lease_body("l", "ns", "a", 10, resource_version="1")
    seen.observe("k", lease)
    clocks.advance(6)
    seen.observe("k", {**lease})  # the same Lease read again
    assert seen.seconds_left("k", lease) == pytest.approx(4)
    relabelled = {**lease, "metadata": {**lease["metadata"], "resourceVersion": "2"}}
    assert seen.seconds_left("k", relabelled) == pytest.approx(10)
    assert seen.observed_at("k") == clocks.monotonic()
    seen.forget("k")
    assert seen.observed_at("k") is None and len(seen) == 0


def test_a_lease_without_a_holder_is_free() -> None:
    seen = observer(Clocks())
    released = {"metadata": {"resourceVersion": "3"},
                "spec": LeaseRecord(holder="a", duration=10, acquire_time=micro_time(T0),
                                    renew_time=micro_time(T0)).released().to_spec()}
    assert seen.expired("k", released)
    assert seen.seconds_left("k", released) == float("-inf")
    assert seen.expired("k", {})  # no spec at all


def test_an_unusable_duration_falls_back_to_the_default() -> None:
    clocks = Clocks()
    seen = observer(clocks, default_duration=15)
    lease = {"metadata": {}, "spec": {"holderIdentity": "a", "leaseDurationSeconds": "soon"}}
    assert seen.seconds_left("k", lease) == pytest.approx(15)


def test_micro_time_round_trips() -> None:
    t = dt.datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=dt.UTC)
    assert micro_time(t) == "2025-03-01T12:00:00.123456Z"
    assert parse_micro_time(micro_time(t)) == t
    plus_two = dt.timezone(dt.timedelta(hours=2))
    assert micro_time(t.astimezone(plus_two)) == "2025-03-01T12:00:00.123456Z"
    assert parse_micro_time("2025-03-01T12:00:00Z") == t.replace(microsecond=0)
    assert parse_micro_time("2025-03-01T12:00:00") == t.replace(microsecond=0)  # naive: read as UTC
    for junk in (None, "", "yesterday", 17):
        assert parse_micro_time(junk) is None
    assert parse_micro_time(micro_time()) is not None


def test_record_round_trips_and_tolerates_junk() -> None:
    spec = {"holderIdentity": "a", "leaseDurationSeconds": 40, "acquireTime": "2025-03-01T12:00:00.000000Z",
            "renewTime": "2025-03-01T12:00:10.000000Z", "leaseTransitions": 3}
    assert LeaseRecord.from_spec(spec).to_spec() == spec
    assert LeaseRecord.from_spec({"holderIdentity": None, "leaseDurationSeconds": -1, "leaseTransitions": "x"}) == \
        LeaseRecord()
    assert LeaseRecord.from_lease(None) == LeaseRecord()


def test_renewing_keeps_the_acquire_time_and_a_takeover_counts_a_transition() -> None:
    held = LeaseRecord(holder="a", duration=10, acquire_time="t0", renew_time="t1", transitions=2)
    renewed = held.renewed_by("a", 10, now="t2")
    assert renewed == LeaseRecord(holder="a", duration=10, acquire_time="t0", renew_time="t2", transitions=2)
    taken = held.renewed_by("b", 9.2, now="t3")
    assert taken == LeaseRecord(holder="b", duration=10, acquire_time="t3", renew_time="t3", transitions=3)
    freed = held.released(now="t4")
    assert (freed.holder, freed.duration, freed.renew_time, freed.transitions) == ("", 1, "t4", 2)
    assert freed.renewed_by("a", 10, now="t5").transitions == 3  # taking a free Lease is a transition too


def test_lease_body() -> None:
    owner = {"apiVersion": "v1", "kind": "Node", "name": "vnode-a", "uid": "u-1"}
    body = lease_body("vnode-a", "kube-node-lease", "replica-1", 39.5, transitions=4, labels={"app": "x"},
                      owner=owner, acquire_time="2025-03-01T12:00:00.000000Z", resource_version="7")
    assert body["apiVersion"] == "coordination.k8s.io/v1" and body["kind"] == "Lease"
    assert body["metadata"] == {"name": "vnode-a", "namespace": "kube-node-lease", "labels": {"app": "x"},
                                "ownerReferences": [owner], "resourceVersion": "7"}
    spec = body["spec"]
    assert spec["holderIdentity"] == "replica-1"
    assert spec["leaseDurationSeconds"] == 40  # an integer, rounded up
    assert spec["leaseTransitions"] == 4
    assert spec["acquireTime"] == "2025-03-01T12:00:00.000000Z"
    assert parse_micro_time(spec["renewTime"]) is not None
    plain = lease_body("l", "ns", "me", 0.2)
    assert plain["metadata"] == {"name": "l", "namespace": "ns"}
    assert plain["spec"]["leaseDurationSeconds"] == 1
    assert plain["spec"]["acquireTime"] == plain["spec"]["renewTime"]
