"""The shipped broker security (manifests/broker: mosquitto.conf settings + acl) on a real mosquitto,
seen by MQTT clients: each base speaks and listens only as itself, the provider reads every base
and commands every base, nobody gets in without an account.

"Never received" is proven by order, not by waiting: the forger's QoS 1 message is acknowledged by
the broker (so routed or dropped) before a legitimate message is published to the same
subscriber; once that one arrives, anything the broker had routed would have arrived first."""

from __future__ import annotations

import queue
import ssl
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from certs import base_client, pki
from devcluster.broker import PROVIDER_USER, Broker, try_login
from koupleless import arklet

ENV = "acl"


class Peer:
    """One MQTT client with an identity: what it received, and the broker's answers."""

    def __init__(self, broker: Broker, user: str | None, password: str | None = None, *,
                 port: int | None = None, tls: dict[str, Any] | None = None) -> None:
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.seen: list[tuple[str, bytes]] = []
        self._suback: queue.Queue[list[str]] = queue.Queue()
        self._puback: dict[int, str] = {}
        self._puback_event = threading.Condition()
        connected: queue.Queue[str] = queue.Queue()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{user}-{uuid.uuid4().hex[:6]}", protocol=mqtt.MQTTv5)
        if user is not None:
            c.username_pw_set(user, password)
        if tls is not None:
            c.tls_set(**tls, cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        c.on_connect = lambda _c, _u, _f, reason, _p: connected.put(str(reason))
        # A refused TLS client certificate shows on the client as the broker closing the connection.
        c.on_disconnect = lambda _c, _u, _f, reason, _p: connected.put(f"connection closed ({reason})")
        c.on_connect_fail = lambda _c, _u: connected.put("connect failed")
        c.on_subscribe = lambda _c, _u, _mid, reasons, _p: self._suback.put([str(r) for r in reasons])
        c.on_publish = self._on_publish
        c.on_message = lambda _c, _u, msg: self.messages.put((msg.topic, bytes(msg.payload)))
        c.connect(broker.host, port or broker.port, keepalive=30)
        c.loop_start()
        self.client = c
        answer = connected.get(timeout=15)
        if answer != "Success":
            self.close()
            raise ConnectionRefusedError(answer)

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        with self._puback_event:
            # "No matching subscribers" is a success too: the broker took the message.
            self._puback[mid] = str(reason) if reason.is_failure else "Accepted"
            self._puback_event.notify_all()

    def subscribe(self, topic: str) -> str:
        """The broker's SUBACK reason for `topic`."""
        self.client.subscribe(topic, qos=1)
        [reason] = self._suback.get(timeout=15)
        return reason

    def publish(self, topic: str, payload: bytes = b"{}", retain: bool = False) -> str:
        """Publish QoS 1 and return the broker's PUBACK: "Accepted" or the refusal's reason."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        with self._puback_event:
            assert self._puback_event.wait_for(lambda: info.mid in self._puback, 15), f"no PUBACK for {topic}"
            return self._puback.pop(info.mid)

    def receive_until(self, topic: str, payload: bytes) -> list[tuple[str, bytes]]:
        """Everything received up to and including (topic, payload); fails if it does not come."""
        got = []
        while True:
            try:
                message = self.messages.get(timeout=15)
            except queue.Empty:
                raise AssertionError(f"never received {topic} {payload!r}; got {got}") from None
            got.append(message)
            self.seen.append(message)
            if message == (topic, payload):
                return got

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def marker() -> bytes:
    return f'{{"marker": "{uuid.uuid4().hex}"}}'.encode()


@pytest.fixture(scope="module")
def broker_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A serving certificate for the broker and a CA for base client certificates (ca.crt), as
    `module-controller certs --base-client` makes them."""
    d = tmp_path_factory.mktemp("broker-certs")
    serving_ca = pki.new_ca("acl-test-serving-ca", days=2)
    pki.write_file(d / "serving-ca.crt", serving_ca.cert_pem)
    pki.issue(serving_ca, "mqtt-broker", ips=["127.0.0.1"], days=2).write(d / "tls.crt", d / "tls.key")
    base_ca = pki.new_ca("acl-test-base-ca", days=2)
    base_ca.write(d / "ca.crt", d / "ca.key")
    base_client.issue_base_clients(base_ca, ["cert-base-a"], d, days=2)
    stranger_ca = pki.new_ca("not-the-broker's", days=2)
    base_client.issue_base_clients(stranger_ca, ["stranger"], d, days=2)
    return d


@pytest.fixture(scope="module")
def broker(broker_certs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    d = broker_certs
    with Broker(workdir=tmp_path_factory.mktemp("mqtt-acl"), tls_cert=d / "tls.crt", tls_key=d / "tls.key",
                client_ca=d / "ca.crt") as b:
        b.add_bases(["base-a", "base-b"])
        yield b


@pytest.fixture
def peers(broker: Broker) -> Iterator[dict[str, Peer]]:
    made = {name: Peer(broker, name, broker.password(name)) for name in ("base-a", "base-b", PROVIDER_USER)}
    yield made
    for p in made.values():
        p.close()


def topic(base_id: str, kind: str) -> str:
    return arklet.topic(ENV, base_id, kind)


def test_a_base_cannot_publish_as_another_base(peers: dict[str, Peer]) -> None:
    a, b, provider = peers["base-a"], peers["base-b"], peers[PROVIDER_USER]
    assert provider.subscribe(arklet.controller_subscription(ENV)) == "Granted QoS 1"
    forged = arklet.encode_envelope({"forged": "by base-a"})
    for kind in (arklet.HEART, arklet.BIZ_OPERATION, arklet.QUERY_BASELINE):
        assert a.publish(topic("base-b", kind), forged) == "Not authorized"
    real = marker()
    assert b.publish(topic("base-b", arklet.HEART), real) == "Accepted"
    got = provider.receive_until(topic("base-b", arklet.HEART), real)
    assert all(payload != forged for _t, payload in got), got


def test_a_base_cannot_command_another_base(peers: dict[str, Peer]) -> None:
    a, b, provider = peers["base-a"], peers["base-b"], peers[PROVIDER_USER]
    for sub in arklet.base_subscriptions(ENV, "base-b"):
        assert b.subscribe(sub) == "Granted QoS 1"
    forged = arklet.encode_command(arklet.BizModel("evil", "1", "https://example.com/evil-1-ark-biz.jar"))
    for kind in (arklet.CMD_INSTALL_BIZ, arklet.CMD_UNINSTALL_BIZ, arklet.CMD_BASELINE):
        assert a.publish(topic("base-b", kind), forged, retain=True) == "Not authorized"
    # a base cannot even overwrite its own retained baseline: commands come from the provider only
    assert a.publish(topic("base-a", arklet.CMD_BASELINE), forged, retain=True) == "Not authorized"
    real = marker()
    assert provider.publish(topic("base-b", arklet.CMD_HEALTH), real) == "Accepted"
    got = b.receive_until(topic("base-b", arklet.CMD_HEALTH), real)
    assert all(payload != forged for _t, payload in got), got


def test_a_base_cannot_read_another_base(peers: dict[str, Peer]) -> None:
    a, provider = peers["base-a"], peers[PROVIDER_USER]
    retained = arklet.encode_command(arklet.BizModel("secret", "1", "https://example.com/secret-1-ark-biz.jar"))
    assert provider.publish(topic("base-b", arklet.CMD_INSTALL_BIZ), retained, retain=True) == "Accepted"
    # mosquitto grants the SUBSCRIBE; what the ACL decides is what it delivers: nothing of B's,
    # neither the retained command nor live ones, nor B's reports
    for sub in (f"koupleless_{ENV}/base-b/+", topic("base-b", arklet.CMD_BASELINE), f"koupleless_{ENV}/#"):
        a.subscribe(sub)
    assert peers["base-b"].publish(topic("base-b", arklet.HEART), b"{}") == "Accepted"
    assert provider.publish(topic("base-b", arklet.CMD_INSTALL_BIZ), retained) == "Accepted"
    own = marker()
    assert provider.publish(topic("base-a", arklet.CMD_HEALTH), own) == "Accepted"
    got = a.receive_until(topic("base-a", arklet.CMD_HEALTH), own)
    assert [t for t, _p in got if "/base-b/" in t] == [], got


def test_the_provider_reads_every_base_and_commands_every_base(peers: dict[str, Peer]) -> None:
    a, b, provider = peers["base-a"], peers["base-b"], peers[PROVIDER_USER]
    assert provider.subscribe(arklet.controller_subscription(ENV)) == "Granted QoS 1"
    for base, peer in (("base-a", a), ("base-b", b)):
        for sub in arklet.base_subscriptions(ENV, base):
            assert peer.subscribe(sub) == "Granted QoS 1"
        hb = marker()
        assert peer.publish(topic(base, arklet.HEART), hb) == "Accepted"
        provider.receive_until(topic(base, arklet.HEART), hb)
        cmd = marker()
        assert provider.publish(topic(base, arklet.CMD_BASELINE), cmd, retain=True) == "Accepted"
        peer.receive_until(topic(base, arklet.CMD_BASELINE), cmd)
    # the provider account is not a base: it cannot report in a base's name
    assert provider.publish(topic("base-a", arklet.HEART), b"{}") == "Not authorized"


def test_nobody_gets_in_without_an_account(broker: Broker) -> None:
    assert try_login(broker.host, broker.port, None, None) == "Not authorized"
    assert try_login(broker.host, broker.port, "base-a", "not-its-password") == "Not authorized"
    assert try_login(broker.host, broker.port, "base-a", broker.password("base-b")) == "Not authorized"
    assert try_login(broker.host, broker.port, "no-such-base", "whatever") == "Not authorized"
    assert try_login(broker.host, broker.port, "base-a", broker.password("base-a")) == "Success"


def test_a_client_certificate_is_the_base_identity(broker: Broker, broker_certs: Path) -> None:
    d = broker_certs
    tls = {"ca_certs": str(d / "serving-ca.crt"), "certfile": str(d / "cert-base-a.crt"),
           "keyfile": str(d / "cert-base-a.key")}
    base = Peer(broker, None, port=broker.client_cert_port, tls=tls)
    provider = Peer(broker, PROVIDER_USER, broker.password(PROVIDER_USER))
    try:
        assert provider.subscribe(arklet.controller_subscription(ENV)) == "Granted QoS 1"
        base.subscribe(f"koupleless_{ENV}/#")
        assert base.publish(topic("base-b", arklet.HEART), b"{}") == "Not authorized"
        hb = marker()
        assert base.publish(topic("cert-base-a", arklet.HEART), hb) == "Accepted"
        got = provider.receive_until(topic("cert-base-a", arklet.HEART), hb)
        assert [t for t, _p in got if t == topic("base-b", arklet.HEART)] == []
        # it reads its own commands and not base-b's
        assert provider.publish(topic("base-b", arklet.CMD_HEALTH), b"{}") == "Accepted"
        own = marker()
        assert provider.publish(topic("cert-base-a", arklet.CMD_HEALTH), own) == "Accepted"
        got = base.receive_until(topic("cert-base-a", arklet.CMD_HEALTH), own)
        assert [t for t, _p in got if "/base-b/" in t] == []
    finally:
        base.close()
        provider.close()


@pytest.mark.parametrize("who", ["no certificate", "a certificate from another CA"])
def test_the_certificate_listener_refuses_a_client_without_a_base_certificate(
        broker: Broker, broker_certs: Path, who: str) -> None:
    d = broker_certs
    tls: dict[str, Any] = {"ca_certs": str(d / "serving-ca.crt")}
    if who != "no certificate":
        tls |= {"certfile": str(d / "stranger.crt"), "keyfile": str(d / "stranger.key")}
    # a user name and password do not stand in for the certificate either
    with pytest.raises((ssl.SSLError, ConnectionError)):
        Peer(broker, "base-a", broker.password("base-a"), port=broker.client_cert_port, tls=tls).close()
