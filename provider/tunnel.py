"""The MQTT connection, on the event loop.

paho-mqtt does the protocol; its socket is watched by the event loop itself (paho's external-loop
API: loop_read / loop_write / loop_misc), so there is no network thread, no wake-up socket written
for every packet and no hand-over of every message between threads. Only the blocking TCP and TLS
connect runs in a worker thread, so a slow broker never stalls the loop. Callbacks reach the rest
of the process through `call_soon`, as if they had come from any other event source. MQTT 5 with a
persistent session (clean_start=False + Session Expiry) lets the broker keep our subscriptions and
queue QoS 1 messages from bases while we reconnect; we still resubscribe on every connect, because a
broker that lost the session (restart without persistence, expiry) says so only through
session_present.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from prometheus_client import Counter

log = logging.getLogger(__name__)


def escape_network_text(record: logging.LogRecord) -> bool:
    """paho's debug lines quote topics as they arrived (a base ID with control or right-to-left
    characters, 65k long): escaped and cut like every other line about a base's input."""
    message = record.getMessage()
    if len(message) > 1000 or not message.isascii() or not message.isprintable():
        record.msg, record.args = message[:1000].encode("unicode_escape").decode("ascii"), ()
    return True

MQTT_CONNECTS = Counter("koupleless_mqtt_connects_total", "MQTT connection attempts by result", ["client", "result"])
MQTT_RECEIVED = Counter("koupleless_mqtt_messages_received_total", "MQTT messages received", ["client"])
MQTT_PUBLISHED = Counter("koupleless_mqtt_messages_published_total", "MQTT messages published", ["client"])

MessageHandler = Callable[[str, bytes], None]


@dataclass(frozen=True)
class BrokerOptions:
    host: str
    port: int = 1883
    username: str | None = None
    password: str | None = None
    #: TLS when any of these is set; the server certificate is always verified.
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    tls: bool = False
    keepalive: int = 60

    @classmethod
    def parse(cls, address: str, **kwargs: Any) -> BrokerOptions:
        """`HOST:PORT` (or `HOST`, port 1883; `[v6]:port` for IPv6)."""
        host, port = address, 1883
        if address.startswith("["):
            host, _, rest = address[1:].partition("]")
            if rest.startswith(":"):
                port = int(rest[1:])
        elif address.count(":") == 1:
            host, _, p = address.partition(":")
            port = int(p)
        if not host:
            raise ValueError(f"--mqtt-broker {address!r}: no host; write HOST:PORT, e.g. 127.0.0.1:1883")
        return cls(host=host, port=port, **kwargs)


class MqttTunnel:
    """One MQTT client. `on_message(topic, payload)` runs on the event loop."""

    def __init__(
        self,
        broker: BrokerOptions,
        *,
        client_id: str,
        subscriptions: Sequence[tuple[str, int]],
        on_message: MessageHandler,
        persistent_session: bool = True,
        session_expiry_s: int = 3600,
        name: str = "provider",
        outbox_limit: int = 0,
        on_connection: Callable[[bool], None] | None = None,
        max_reconnect_delay: int = 2,
    ) -> None:
        self.broker = broker
        self.client_id = client_id
        self.name = name
        self._subscriptions = list(subscriptions)
        self._on_message = on_message
        self._persistent = persistent_session
        self._session_expiry = session_expiry_s
        self._on_connection = on_connection
        self._max_reconnect_delay = max(1, max_reconnect_delay)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        #: The socket the loop watches for reading (None while not connected), and for writing when
        #: a write could not finish at once.
        self._sock: Any = None
        self._writing: Any = None
        self._flush_scheduled = False
        self._connected_this_time = False
        self._closed = asyncio.Event()
        self._wake = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()
        #: Set once the broker has answered every SUBSCRIBE sent on the latest connect (SUBACK):
        #: from then on it routes those topics to us. Cleared on disconnect.
        self.subscribed = asyncio.Event()
        self._pending_subacks: dict[int, list[str]] = {}
        self.connect_count = 0
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
        )
        c = self._client
        self._stopping = False
        paho_log = logging.getLogger(__name__ + ".paho")
        # paho's network thread makes one last pass after our disconnect and logs it as an error.
        paho_log.addFilter(lambda record: not (self._stopping and "not connected" in record.getMessage()))
        paho_log.addFilter(escape_network_text)
        c.enable_logger(paho_log)
        c.max_inflight_messages_set(1000)
        # Bounded: during an outage commands wait here, and whoever sent them sends them again if
        # they are still wanted once the broker is back (0: unbounded, for the simulator).
        c.max_queued_messages_set(outbox_limit)
        # A bug in a callback is logged by paho and the connection goes on.
        c.suppress_exceptions = True
        if broker.username is not None:
            c.username_pw_set(broker.username, broker.password)
        if broker.tls or broker.ca_file or broker.cert_file:
            c.tls_set(
                ca_certs=broker.ca_file,
                certfile=broker.cert_file,
                keyfile=broker.key_file,
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
            c.tls_insecure_set(False)
        c.on_socket_open = self._paho_socket_open
        c.on_socket_close = self._paho_socket_close
        c.on_socket_register_write = self._paho_register_write
        c.on_socket_unregister_write = self._paho_unregister_write
        c.on_connect = self._paho_connect
        c.on_disconnect = self._paho_disconnect
        c.on_subscribe = self._paho_subscribe
        c.on_message = self._paho_message

    # --- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start connecting in the background; `connected` is set once the broker accepts us."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        props = Properties(PacketTypes.CONNECT)
        if self._persistent:
            props.SessionExpiryInterval = self._session_expiry
        self._client.connect_async(
            self.broker.host,
            self.broker.port,
            keepalive=self.broker.keepalive,
            clean_start=not self._persistent,
            properties=props,
        )
        self._runner = self._loop.create_task(self._keep_connected(), name=f"mqtt-{self.name}")

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._sock is not None:
            self._client.disconnect()  # written by the loop; paho closes the socket once it is out
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), 2.0)
            self._drop_socket()
        if self._runner is not None:
            try:
                # A connect still in its thread finishes within paho's connect timeout (5 s).
                await asyncio.wait_for(self._runner, 10.0)
            except (TimeoutError, asyncio.CancelledError):
                pass
        self.connected.clear()

    async def _keep_connected(self) -> None:
        """Connect, serve the socket until it closes, wait, connect again; until `stop`. A local
        broker that restarts is back in about a second: a long backoff only adds silence."""
        delay = 1.0
        while not self._stopping:
            self._connected_this_time = False
            try:
                await asyncio.to_thread(self._client.reconnect)
            except Exception as exc:  # OSError, ssl.SSLError, ValueError: all mean "not now"
                MQTT_CONNECTS.labels(self.name, "failed").inc()
                if not self._stopping:
                    log.error("%s; retrying", connect_error_message(self.broker, exc))
            else:
                if self._stopping:
                    self._drop_socket(self._client.socket())
                    return
                self._watch(self._client.socket())
                await self._serve()
                if self._connected_this_time:
                    delay = 1.0
            if self._stopping:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            delay = min(delay * 2, float(self._max_reconnect_delay))

    def _watch(self, sock: Any) -> None:
        assert self._loop is not None
        if sock is None:
            return
        self._sock = sock
        self._closed.clear()
        self._loop.add_reader(sock, self._readable)
        self._flush()  # the CONNECT queued while connecting

    async def _serve(self) -> None:
        """Until the socket closes; paho's keepalive (PINGREQ, and giving up on a silent broker)
        runs every second, as its own loop would run it."""
        while self._sock is not None:
            try:
                await asyncio.wait_for(self._closed.wait(), 1.0)
            except TimeoutError:
                self._client.loop_misc()

    def _readable(self) -> None:
        sock = self._sock
        self._client.loop_read()
        # TLS: records the kernel already handed over may wait, decrypted, in the SSL object, where
        # the loop's selector cannot see them.
        while sock is not None and self._sock is sock and isinstance(sock, ssl.SSLSocket) and sock.pending():
            self._client.loop_read()

    def _flush(self) -> None:
        self._flush_scheduled = False
        sock = self._sock
        if sock is None:
            return
        self._client.loop_write()
        if self._sock is sock and self._client.want_write() and self._writing is None:
            assert self._loop is not None
            self._loop.add_writer(sock, self._client.loop_write)  # the socket's buffer was full
            self._writing = sock

    def _drop_socket(self, sock: Any = None) -> None:
        """Stop watching the socket and close it (stop(), or a connect that finished after it)."""
        sock = sock if sock is not None else self._sock
        if sock is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)
        with contextlib.suppress(OSError):
            sock.close()
        if sock is self._sock:
            self._sock = self._writing = None
            self._closed.set()

    def add_subscription(self, topic: str, qos: int = 1) -> None:
        """Subscribe now and again on every reconnect."""
        self._subscriptions.append((topic, qos))
        if self._client.is_connected():
            self._client.subscribe(topic, qos)

    def remove_subscription(self, topic: str) -> None:
        self._subscriptions = [(t, q) for t, q in self._subscriptions if t != topic]
        if self._client.is_connected():
            self._client.unsubscribe(topic)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> mqtt.MQTTMessageInfo:
        """Queue a message; paho sends it now or after the next connect. Thread-safe, never blocks.
        `info.rc` is MQTT_ERR_QUEUE_SIZE when the outbox is full and the message was dropped."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != mqtt.MQTT_ERR_QUEUE_SIZE:
            MQTT_PUBLISHED.labels(self.name).inc()
        return info

    def send(self, topic: str, payload: bytes, *, qos: int = 1) -> bool:
        """`publish`, answering whether the message was sent or queued (False: outbox full)."""
        return self.publish(topic, payload, qos=qos).rc != mqtt.MQTT_ERR_QUEUE_SIZE

    async def flush(self, infos: list[mqtt.MQTTMessageInfo], wait_s: float = 2.0) -> None:
        """Wait (off the loop) until these messages reached the broker, or `wait_s`."""

        def wait() -> None:
            for info in infos:
                try:
                    info.wait_for_publish(wait_s)
                except (RuntimeError, ValueError):
                    return

        if infos and self._client.is_connected():
            await asyncio.to_thread(wait)

    # --- paho callbacks (on the loop, but for the socket opening in the connecting thread) -----------

    def _paho_socket_open(self, _c: mqtt.Client, _u: Any, sock: Any) -> None:
        # paho leaves Nagle on: a small command written while the broker has not yet acknowledged
        # the previous one then waits for that ACK, which the kernel may delay by 40 ms. Commands
        # and replies are single small packets; send each at once.
        with contextlib.suppress(AttributeError, OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _paho_socket_close(self, _c: mqtt.Client, _u: Any, sock: Any) -> None:
        # paho closes the socket right after this returns.
        if sock is not self._sock or threading.get_ident() != self._loop_thread or self._loop is None:
            return
        self._loop.remove_reader(sock)
        if self._writing is not None:
            self._loop.remove_writer(sock)
        self._sock = self._writing = None
        self._closed.set()

    def _paho_register_write(self, _c: mqtt.Client, _u: Any, _sock: Any) -> None:
        # Something was queued: write it once the current callbacks are done, in one go. In the
        # connecting thread (the CONNECT packet) `_watch` does it.
        if self._flush_scheduled or threading.get_ident() != self._loop_thread or self._loop is None:
            return
        self._flush_scheduled = True
        self._loop.call_soon(self._flush)

    def _paho_unregister_write(self, _c: mqtt.Client, _u: Any, sock: Any) -> None:
        if self._writing is not None and self._loop is not None and threading.get_ident() == self._loop_thread:
            self._loop.remove_writer(self._writing)
            self._writing = None

    def _paho_connect(self, client: mqtt.Client, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            MQTT_CONNECTS.labels(self.name, "refused").inc()
            log.error("%s; retrying", refusal_message(self.broker, self.client_id, reason))
            return
        MQTT_CONNECTS.labels(self.name, "ok").inc()
        self._connected_this_time = True
        # Always resubscribe: cheap, and the only safe answer when the broker lost our session.
        subs = list(self._subscriptions)
        self._pending_subacks.clear()
        for start in range(0, len(subs), 100):
            batch = subs[start : start + 100]
            _rc, mid = client.subscribe([(t, mqtt.SubscribeOptions(qos=q)) for t, q in batch])
            if mid is not None:
                self._pending_subacks[mid] = [t for t, _q in batch]
        if not subs:
            self._to_loop(self.subscribed.set)
        log.info(
            "MQTT connected to %s:%s as %s (session present: %s, %d subscriptions)",
            self.broker.host, self.broker.port, self.client_id, flags.session_present, len(subs),
        )
        self._to_loop(self._set_connected, True)

    def _paho_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason is not None and getattr(reason, "is_failure", False):
            log.warning("MQTT connection to %s:%s lost: %s; reconnecting", self.broker.host, self.broker.port, reason)
        self._to_loop(self._set_connected, False)

    def _paho_subscribe(self, _c: mqtt.Client, _u: Any, mid: int, reasons: Any, _p: Any) -> None:
        topics = self._pending_subacks.pop(mid, [])
        for topic, reason in zip(topics, reasons or [], strict=False):
            if getattr(reason, "is_failure", False):
                who = f"user {self.broker.username!r}" if self.broker.username else "this client"
                log.error("MQTT broker %s:%s refused the subscription to %s: %s — its ACL does not let %s read "
                          "that topic", self.broker.host, self.broker.port, topic, reason, who)
        if not self._pending_subacks:
            self._to_loop(self.subscribed.set)

    def _paho_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        MQTT_RECEIVED.labels(self.name).inc()
        self._to_loop(self._on_message, msg.topic, msg.payload)

    def _set_connected(self, up: bool) -> None:
        if up == self.connected.is_set():
            return
        if up:
            self.connect_count += 1
            self.connected.set()
        else:
            self.connected.clear()
            self.subscribed.clear()
        if self._on_connection is not None:
            self._on_connection(up)

    def _to_loop(self, fn: Callable[..., None], *args: Any) -> None:
        """Run `fn` on the loop after the current paho callback, never inside it: what it does
        (publish, subscribe, a Node write) must not happen while paho is reading a packet."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            if threading.get_ident() == self._loop_thread:
                loop.call_soon(fn, *args)
            else:
                loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # loop closing during shutdown
            pass


#: MQTT 5 CONNACK reason codes (and their MQTT 3.1.1 equivalents) that mean "your credentials".
_AUTH_REFUSALS = {4, 5, 134, 135}


def refusal_message(broker: BrokerOptions, client_id: str, reason: Any) -> str:
    where = f"MQTT broker {broker.host}:{broker.port} refused client {client_id}: {reason}"
    if getattr(reason, "value", None) in _AUTH_REFUSALS:
        if broker.username is None:
            return f"{where} — the broker wants credentials: set --mqtt-username and --mqtt-password-file (or MQTT_PASSWORD)"
        return (f"{where} — check --mqtt-username ({broker.username!r}) and the password in --mqtt-password-file "
                "(or MQTT_PASSWORD)")
    return where


def connect_error_message(broker: BrokerOptions, exc: BaseException | None) -> str:
    where = f"MQTT broker {broker.host}:{broker.port}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = exc.verify_message or str(exc)
        if broker.ca_file:
            hint = f"check that --mqtt-ca ({broker.ca_file}) holds the CA that signed the broker's certificate"
        else:
            hint = "pass the CA that signed the broker's certificate with --mqtt-ca"
        if "hostname" in detail.lower() or "IP address mismatch" in detail:
            hint = f"the broker's certificate does not name {broker.host!r}; connect with a name it lists in --mqtt-broker"
        return f"{where}: TLS certificate not trusted ({detail}); {hint}"
    if isinstance(exc, ssl.SSLError):
        return (f"{where}: TLS handshake failed ({exc.reason or exc}); is the broker's listener TLS (--mqtt-tls/--mqtt-ca) "
                "or plain MQTT (neither flag)?")
    if isinstance(exc, ConnectionRefusedError):
        return f"{where}: connection refused; is the broker running at --mqtt-broker {broker.host}:{broker.port}?"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError)) and (broker.tls or broker.ca_file):
        return f"{where}: connection reset during connect; is that port a TLS listener?"
    return f"{where}: cannot connect: {exc!r}"


def add_broker_arguments(parser: Any) -> None:
    g = parser.add_argument_group("MQTT broker")
    g.add_argument("--mqtt-broker", required=True, metavar="HOST:PORT", help="MQTT broker address, e.g. 127.0.0.1:1883")
    g.add_argument("--mqtt-username", default=None, help="broker user name")
    g.add_argument(
        "--mqtt-password-file", default=None, metavar="FILE",
        help="file holding the broker password (or set MQTT_PASSWORD in the environment)",
    )
    g.add_argument("--mqtt-tls", action="store_true", help="connect with TLS, verifying the broker's certificate")
    g.add_argument("--mqtt-ca", default=None, metavar="FILE", help="CA bundle that signed the broker's certificate (implies TLS)")
    g.add_argument("--mqtt-cert", default=None, metavar="FILE", help="client certificate for mutual TLS")
    g.add_argument("--mqtt-key", default=None, metavar="FILE", help="client key for mutual TLS")


def broker_from_args(args: Any) -> BrokerOptions:
    password = os.environ.get("MQTT_PASSWORD")
    if args.mqtt_password_file:
        try:
            with open(args.mqtt_password_file, encoding="utf-8") as f:
                password = f.read().strip()
        except OSError as exc:
            raise ValueError(f"--mqtt-password-file {args.mqtt_password_file}: {exc.strerror or exc}") from exc
    for flag, path in (("--mqtt-ca", args.mqtt_ca), ("--mqtt-cert", args.mqtt_cert), ("--mqtt-key", args.mqtt_key)):
        if path and not os.access(path, os.R_OK):
            raise ValueError(f"{flag} {path}: no such readable file")
    if bool(args.mqtt_cert) != bool(args.mqtt_key):
        raise ValueError("--mqtt-cert and --mqtt-key go together (mutual TLS needs both)")
    if args.mqtt_ca:
        try:
            ssl.create_default_context(cafile=args.mqtt_ca)
        except ssl.SSLError as exc:
            raise ValueError(f"--mqtt-ca {args.mqtt_ca}: not a PEM CA bundle ({exc.reason or exc})") from exc
    if args.mqtt_cert:
        try:
            ssl.create_default_context().load_cert_chain(args.mqtt_cert, args.mqtt_key)
        except ssl.SSLError as exc:
            raise ValueError(f"--mqtt-cert/--mqtt-key: not a matching PEM certificate and key ({exc.reason or exc})") from exc
    return BrokerOptions.parse(
        args.mqtt_broker,
        username=args.mqtt_username,
        password=password,
        ca_file=args.mqtt_ca,
        cert_file=args.mqtt_cert,
        key_file=args.mqtt_key,
        tls=args.mqtt_tls,
    )
