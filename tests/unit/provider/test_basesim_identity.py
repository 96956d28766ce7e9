"""base-sim with per-base identity: one connection per base, logged in as its baseID, on mosquitto
with the shipped ACL; the flags that give the credentials; the shipped files against the topic table."""

from __future__ import annotations

import argparse
import uuid
from pathlib import Path

import pytest

from devcluster.broker import PROVIDER_USER, SHIPPED_DIR, Broker, shipped_settings
from koupleless import arklet
from provider import basesim_logins
from provider.basesim import BaseSimulator
from provider.basesim_cli import add_arguments
from provider.tunnel import BrokerOptions
from tests.helpers import async_wait_until
from tests.unit.provider.test_basesim import V1, Controller, _true


async def test_each_base_speaks_on_its_own_account(mqtt_broker: Broker) -> None:
    env = "id" + uuid.uuid4().hex[:8]
    ids = [f"{env}-b-0", f"{env}-b-1"]
    mqtt_broker.add_bases(ids)
    plain = BrokerOptions(mqtt_broker.host, mqtt_broker.port)
    logins = {b: BrokerOptions(plain.host, plain.port, username=b, password=mqtt_broker.password(b)) for b in ids}
    ctl = Controller(BrokerOptions(plain.host, plain.port, username=PROVIDER_USER,
                                   password=mqtt_broker.password(PROVIDER_USER)), env)
    await ctl.tunnel.start()
    await async_wait_until(lambda: _true(ctl.tunnel.subscribed.is_set()), 10, what="controller subscribed")
    sim = BaseSimulator(plain, env=env, count=2, id_prefix=f"{env}-b-", heartbeat_interval=0.5, logins=logins)
    try:
        await sim.start()
        assert sorted(t.client_id for t in sim.connections) == [f"koupleless@@@{b}" for b in ids]
        assert sim.snapshot()["connected"] is True
        await async_wait_until(lambda: _true(all(len(ctl.of(b, arklet.HEART)) >= 2 for b in ids)), 15,
                               what="heartbeats from both bases")
        # a command reaches only its base, whose own connection answers
        ctl.send(ids[0], arklet.CMD_INSTALL_BIZ, V1)
        await async_wait_until(lambda: _true(ctl.of(ids[0], arklet.BIZ_OPERATION)), 10, what="install reply")
        assert [m["name"] for m in sim.snapshot()["bases"][ids[0]]["modules"]] == ["biz1"]
        assert sim.snapshot()["bases"][ids[1]]["modules"] == []
        # replay goes out on the base's own connection, which the ACL lets publish only as itself
        assert sim.replay(ids[0])
        await async_wait_until(lambda: _true(len(ctl.raw(ids[0], arklet.BIZ_OPERATION)) == 2), 10, what="replay")
        # a killed base falls silent; its neighbour keeps heartbeating
        sim.kill(ids[1])
        silent_from = len(ctl.of(ids[1], arklet.HEART))
        beats = len(ctl.of(ids[0], arklet.HEART))
        await async_wait_until(lambda: _true(len(ctl.of(ids[0], arklet.HEART)) >= beats + 3), 10)
        assert len(ctl.of(ids[1], arklet.HEART)) <= silent_from + 1  # at most one already in flight
    finally:
        await sim.stop()
        await ctl.tunnel.stop()


def test_every_base_needs_a_login() -> None:
    plain = BrokerOptions("127.0.0.1", 1883)
    with pytest.raises(ValueError, match="no credentials for base 'x-1'"):
        BaseSimulator(plain, count=2, id_prefix="x-", logins={"x-0": plain})


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["--mqtt-broker", "127.0.0.1:1883", *argv])


def test_password_file_gives_each_base_its_user_and_password(tmp_path: Path) -> None:
    f = tmp_path / "bases"
    f.write_text("# baseID:password\nb-0:zero\n\nb-1:o:ne\n")
    logins = basesim_logins.logins_from_args(_args("--base-password-file", str(f)), BrokerOptions("h"), ["b-0", "b-1"])
    assert logins is not None
    assert {b: (o.username, o.password) for b, o in logins.items()} == {"b-0": ("b-0", "zero"), "b-1": ("b-1", "o:ne")}
    assert basesim_logins.logins_from_args(_args(), BrokerOptions("h"), ["b-0"]) is None  # shared connection


@pytest.mark.parametrize(("content", "argv", "error"), [
    ("b-0:zero\n", [], "has no line for base 'b-1' (1 of 2 missing); add `b-1:<password>`"),
    ("b-0\n", [], ":1: not a baseID:password line"),
    ("b-0:zero\nb-1:one\n", ["--mqtt-username", "bases"], "drop --mqtt-username"),
    ("b-0:zero\nb-1:one\n", ["--base-cert-dir", "/nowhere"], "give one"),
])
def test_bad_password_file_or_flags_are_named(tmp_path: Path, content: str, argv: list[str], error: str) -> None:
    f = tmp_path / "bases"
    f.write_text(content)
    with pytest.raises(ValueError, match="--") as exc:
        basesim_logins.logins_from_args(_args("--base-password-file", str(f), *argv), BrokerOptions("h"), ["b-0", "b-1"])
    assert error in str(exc.value)


def test_cert_dir_names_the_missing_certificate_and_how_to_issue_it(tmp_path: Path) -> None:
    (tmp_path / "b-0.crt").write_text("x")
    (tmp_path / "b-0.key").write_text("x")
    args = _args("--base-cert-dir", str(tmp_path))
    logins = basesim_logins.logins_from_args(args, BrokerOptions("h"), ["b-0"])
    assert logins is not None and logins["b-0"].cert_file == str(tmp_path / "b-0.crt") and logins["b-0"].tls
    with pytest.raises(ValueError, match=r"no readable b-1.crt for base 'b-1'; issue it with `module-controller "
                                         r"certs --base-client b-1"):
        basesim_logins.logins_from_args(args, BrokerOptions("h"), ["b-0", "b-1"])


def _acl_rules() -> dict[str, set[str]]:
    """'pattern write', 'pattern read', 'provider read', 'provider write' -> topics, from the shipped acl."""
    rules: dict[str, set[str]] = {}
    user = ""
    for raw in (SHIPPED_DIR / "acl").read_text().splitlines():
        words = raw.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "user":
            user = words[1]
        elif words[0] == "pattern":
            rules.setdefault(f"pattern {words[1]}", set()).add(words[2])
        elif words[0] == "topic":
            rules.setdefault(f"{user} {words[1]}", set()).add(words[2])
    return rules


def test_shipped_acl_fits_the_topic_table() -> None:
    rules = _acl_rules()
    # a base publishes exactly arklet's base topics, under its own ID
    assert rules["pattern write"] == {f"+/%u/{kind}" for kind in arklet.BASE_TOPICS}
    # and reads what arklet subscribes to
    assert rules["pattern read"] == {"+/" + t.split("/", 1)[1] for t in arklet.base_subscriptions("x", "%u")}
    # the provider writes exactly the commands and reads every base's reports
    assert rules[f"{PROVIDER_USER} write"] == {f"+/+/{cmd}" for cmd in arklet.COMMANDS}
    assert rules[f"{PROVIDER_USER} read"] == {"+/+/base/#"}


def test_shipped_conf_refuses_anonymous_clients_and_names_bases_by_certificate() -> None:
    assert "allow_anonymous false" in shipped_settings("global")
    assert shipped_settings("client-cert") == ["require_certificate true", "use_identity_as_username true"]
