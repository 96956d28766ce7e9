"""Which heartbeats may make a Node (provider/admission.py), through the provider's real MQTT handler:
odd base IDs, the allow-lists, the limit on new bases, forged goodbyes and disagreeing IDs."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import pytest

from koupleless import arklet, arklet_parse, keys
from provider import admission, vnode
from provider.admission import AdmissionOptions, BaseAdmission
from tests.unit.provider.rig import ENV, Rig

ODD_IDS = [
    "evil.base",  # dotted, but not an IPv4 address
    "$(reboot)",
    "base\u202eesab",  # a right-to-left override
    "x" * 253,
    "Base-1",
    "base 1",
    "a..b",  # would be an invalid Node name
    "x.-y",  # would be an invalid Node name
    "-lead",
    "trail-",
    "x_y",
    "\u00fcnic\u00f6de",
]
GOOD_IDS = ["10.1.0.45", str(uuid.uuid4()), "unknown-ab1cd", "b-0", "a", "x" * admission.MAX_BASE_ID_LENGTH]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def heart(base_id: str, name: str = "base", cluster: str = "c", state: str = "activated",
          identity: str | None = None) -> dict[str, Any]:
    return {"baseMetadata": {"identity": base_id if identity is None else identity, "name": name,
                             "version": "1.1.1", "clusterName": cluster},
            "localIP": "10.0.0.1", "localHostName": "h", "port": 0, "state": state}


def rig_with(opts: AdmissionOptions | None = None, **kw: Any) -> tuple[Rig, Clock]:
    rig = Rig(admission=opts or AdmissionOptions(), **kw)
    clock = Clock()
    rig.provider.admission.clock = clock
    rig.provider.admission.events = rig.events
    rig.provider.admission._summarised_at = clock.now
    return rig, clock


def refused_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused base ")]


def test_odd_base_ids_are_refused_once_each_and_make_no_base(caplog: pytest.LogCaptureFixture) -> None:
    rig, _clock = rig_with()
    before = {r: _refused(r) for r in ("invalid_id", "id_pattern")}
    with caplog.at_level(logging.INFO):
        for _ in range(3):  # every base heartbeats again and again
            for base_id in ODD_IDS:
                rig.heartbeat(base_id)
    assert rig.registry.bases == {} and rig.node_syncs == []
    lines = refused_lines(caplog)
    assert len(lines) == len(ODD_IDS), "one line per refused ID, not one per heartbeat"
    assert all(line.isascii() and len(line) < 600 for line in lines), "escaped and bounded"
    assert any("'base\\u202eesab'" in line for line in lines)
    assert not any(r.exc_info for r in caplog.records), "no traceback"
    events = [e for e in rig.events.sent if e[2] == "BaseRefused"]
    assert len(events) == len(ODD_IDS) and all(e[1] == "Warning" and e[0] == "default" for e in events)
    assert all(m.isascii() for _n, _t, _r, m in events)
    counted = sum(_refused(r) - before[r] for r in before)
    assert counted == len(ODD_IDS)


def test_real_base_ids_are_admitted_as_their_own_node_names() -> None:
    rig, _clock = rig_with()
    for base_id in GOOD_IDS:
        rig.heartbeat(base_id)
    assert sorted(rig.registry.bases) == sorted(GOOD_IDS)
    assert sorted(rig.node_syncs) == sorted(keys.VNODE_NAME_PREFIX + b for b in GOOD_IDS)
    for base_id in GOOD_IDS:
        name = rig.base(base_id).node_name
        assert name == keys.VNODE_NAME_PREFIX + base_id and len(name) <= 63
        assert vnode.node_labels(rig.base(base_id), vnode.NodeOptions())[keys.LABEL_HOSTNAME] == name


def test_a_pattern_narrows_or_widens_the_ids_and_allow_lists_the_names() -> None:
    rig, _clock = rig_with(AdmissionOptions(base_id_pattern=r"10\.1\.[0-9.]+|[a-z.]+",
                                            allowed_base_names=frozenset({"base"}),
                                            allowed_cluster_names=frozenset({"c", "d"})))
    rig.heartbeat("10.1.0.45")
    rig.heartbeat("10.2.0.45")  # not under the pattern
    rig.heartbeat("evil.base")  # the pattern accepts dotted names
    rig.heartbeat("Evil.base")  # but never one that is no Node name
    rig.say("10.1.0.46", arklet.HEART, heart("10.1.0.46", name="other"))
    rig.say("10.1.0.47", arklet.HEART, heart("10.1.0.47", cluster="e"))
    rig.say("10.1.0.48", arklet.HEART, heart("10.1.0.48", cluster="d"))
    assert sorted(rig.registry.bases) == ["10.1.0.45", "10.1.0.48", "evil.base"]
    reasons = [m for _n, _t, r, m in rig.events.sent if r == "BaseRefused"]
    assert len(reasons) == 4
    assert any("--base-id-pattern" in m and "10.2.0.45" in m for m in reasons)
    assert any("baseMetadata.name 'other' is not in --allowed-base-names base" in m for m in reasons)
    assert any("baseMetadata.clusterName 'e'" in m for m in reasons)
    # an admitted base that starts to claim a name not allowed: those heartbeats do not count
    b = rig.base("10.1.0.45")
    heard = b.last_heard
    b.last_heard -= 100
    rig.say("10.1.0.45", arklet.HEART, heart("10.1.0.45", name="other"))
    assert b.heartbeat is not None and b.heartbeat.metadata.name == "base" and b.last_heard < heard


def test_new_bases_beyond_the_limit_wait_for_a_later_heartbeat(caplog: pytest.LogCaptureFixture) -> None:
    rig, clock = rig_with(AdmissionOptions(new_bases_per_minute=20))
    throttled = admission.BASES_THROTTLED._value.get()
    with caplog.at_level(logging.WARNING):
        for i in range(1000):
            rig.heartbeat(f"flood-{i}")
    assert len(rig.registry.bases) == 20
    assert admission.BASES_THROTTLED._value.get() - throttled == 980
    limit_lines = [r for r in caplog.records if "--new-bases-per-minute" in r.getMessage()]
    assert len(limit_lines) == 1, "one line at the start of a flood, not one per heartbeat"
    clock.now += 59
    rig.heartbeat("flood-500")
    assert "flood-500" not in rig.registry.bases
    clock.now += 1.5  # the minute since the first 20 is over: a summary, and the next heartbeats get in
    rig.provider.admission.tick()
    [summary] = [r.getMessage() for r in caplog.records if "in the last minute" in r.getMessage()]
    assert summary.startswith("981 heartbeats of new bases not admitted")
    rig.heartbeat("flood-500")
    assert "flood-500" in rig.registry.bases
    # heartbeats of bases already admitted are never limited
    for i in range(20):
        rig.heartbeat(f"flood-{i}")
    assert len(rig.registry.bases) == 21


def test_a_base_whose_node_exists_is_not_counted_as_new() -> None:
    rig, _clock = rig_with(AdmissionOptions(new_bases_per_minute=1))
    existing = {"virtual-node-b-2", "virtual-node-b-3"}
    rig.provider.admission.node_exists = lambda name: name in existing
    for base_id in ("b-1", "b-2", "b-3", "b-4"):
        rig.heartbeat(base_id)
    assert sorted(rig.registry.bases) == ["b-1", "b-2", "b-3"]


def test_refusals_in_a_flood_are_summarised_and_memory_stays_bounded(caplog: pytest.LogCaptureFixture,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admission, "REFUSED_MEMORY", 100)
    rig, clock = rig_with()
    with caplog.at_level(logging.WARNING):
        for i in range(500):
            rig.heartbeat(f"Flood-{i}")
    adm = rig.provider.admission
    assert len(adm._refused) == 100
    assert len(refused_lines(caplog)) == admission.REFUSAL_REPORTS_PER_MINUTE
    assert len([e for e in rig.events.sent if e[2] == "BaseRefused"]) == admission.REFUSAL_REPORTS_PER_MINUTE
    clock.now += 61
    adm.tick()
    [summary] = [r.getMessage() for r in caplog.records if "more base IDs in the last minute" in r.getMessage()]
    assert summary.startswith(f"refused {500 - admission.REFUSAL_REPORTS_PER_MINUTE} more base IDs")


def test_a_forged_goodbye_does_not_make_a_node_not_ready() -> None:
    rig, clock = rig_with(heartbeat_interval=10)
    rig.registry.clock = clock
    rig.registry.connection_changed(True)
    rig.heartbeat("b1")
    b = rig.base("b1")
    assert b.ready
    # a forger's DEACTIVATED heartbeat, dated ahead so it would make the real heartbeats "stale"
    rig.say("b1", arklet.HEART, heart("b1", state="deactivated"), ts=arklet.now_ms() + 9_000)
    assert b.ready and b.goodbye_at is not None
    forged_at = b.goodbye_at
    clock.now += 10
    rig.heartbeat("b1")  # the real base, ten seconds later, still alive
    assert b.goodbye_at is None
    rig.registry.judge(forged_at + 25)  # past the goodbye's two intervals, not 2 missed heartbeats
    assert b.ready
    # a real goodbye: nothing follows it, so two intervals later the Node is NotReady
    rig.heartbeat("b1", state="deactivated")
    assert b.ready
    rig.registry.judge(b.goodbye_at + 21)  # type: ignore[operator]
    assert not b.ready and b.not_ready_reason == "BaseDeactivated"
    # the goodbye changed nothing the Node shows: no forged IP or name through a DEACTIVATED heartbeat
    rig.say("b1", arklet.HEART, {**heart("b1", state="deactivated", name="x"), "localIP": "6.6.6.6"})
    assert b.ip == "10.0.0.1" and b.heartbeat is not None and b.heartbeat.metadata.name == "base"


def test_ids_that_disagree_are_refused_for_heartbeats_and_query_baseline() -> None:
    rig, _clock = rig_with()
    rig.say("b1", arklet.HEART, heart("b1", identity="b2"))
    assert rig.registry.bases == {}
    rig.heartbeat("b1")
    rig.inventory("b1")
    b = rig.base("b1")
    assert b.inventory_known
    before = _rejected("identity_mismatch")
    rig.say("b1", arklet.QUERY_BASELINE, {"identity": "b2", "name": "base", "version": "1", "clusterName": "c"})
    assert b.inventory_known, "another base's queryBaseline does not make this one forget its modules"
    assert _rejected("identity_mismatch") == before + 1
    rig.say("b1", arklet.QUERY_BASELINE, {"identity": "b1", "name": "base", "version": "1", "clusterName": "c"})
    assert not b.inventory_known


def test_node_fields_from_a_heartbeat_are_bounded() -> None:
    rig, _clock = rig_with()
    long = "n" * 5000
    rig.say("b1", arklet.HEART, {**heart("b1", name=long + "!", cluster="\u202ec"), "localIP": "not-an-ip",
                                 "localHostName": "$(reboot)"})
    node = vnode.build_node(rig.base("b1"), vnode.NodeOptions(), "2026-01-01T00:00:00Z")
    labels = node["metadata"]["labels"]
    assert all(len(v) <= 63 for v in labels.values())
    assert labels[keys.LABEL_BASE_CLUSTER_NAME] == "c"
    assert len(node["status"]["nodeInfo"]["osImage"]) < 100
    assert node["status"]["addresses"] == [{"type": "InternalIP", "address": "127.0.0.1"},
                                           {"type": "Hostname", "address": "virtual-node-b1"}]


def test_approval_taint_is_only_on_a_new_node() -> None:
    rig, _clock = rig_with()
    rig.heartbeat("b1")
    opts = vnode.NodeOptions(approve_new_bases=True)
    taints = vnode.build_node(rig.base("b1"), opts, "now")["spec"]["taints"]
    assert {"key": keys.TAINT_UNAPPROVED, "value": "true", "effect": "NoSchedule"} in taints
    # what the reconciler puts back when someone edits taints away does not include it
    assert keys.TAINT_UNAPPROVED not in {t["key"] for t in vnode.node_taints(opts)}


def _refused(reason: str) -> float:
    return float(admission.BASES_REFUSED.labels(reason)._value.get())


def _rejected(reason: str) -> float:
    from provider.bases import MQTT_REJECTED

    return float(MQTT_REJECTED.labels(reason)._value.get())


def test_options_from_the_command_line() -> None:
    import argparse

    from provider import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--mqtt-broker", "127.0.0.1:1883", "--base-id-pattern", "b-[0-9]+", "--allowed-base-names", "base, other,",
                              "--allowed-cluster-names", "c", "--new-bases-per-minute", "5", "--approve-new-bases"])
    opts = cli.options_from_args(args)
    assert opts.admission.allowed_base_names == {"base", "other"}
    assert opts.admission.allowed_cluster_names == {"c"}
    assert opts.admission.new_bases_per_minute == 5 and opts.node.approve_new_bases
    adm = BaseAdmission(opts.admission, ENV)
    hb = arklet_parse.parse_heartbeat(heart("b-1"), "b-1")
    assert adm.refusal("b-1", hb) is None and adm.refusal("b-x", hb) is not None
    defaults = cli.options_from_args(parser.parse_args(["--mqtt-broker", "127.0.0.1:1883"]))
    assert defaults.admission.new_bases_per_minute == admission.DEFAULT_NEW_BASES_PER_MINUTE
    assert not defaults.node.approve_new_bases
