"""arklet's HTTP tunnel, the provider's side: the server bases POST their heartbeats to.

A base configured with `koupleless.arklet.http.heartbeat.endpoint=<URL>` POSTs its BaseStatus (no
envelope; its `port` is arklet's HTTP port) to `<URL>/heartbeat` every 12 s (reference §3.1). Each
heartbeat becomes the same observed state as an MQTT one, with the base marked as reached over HTTP
at its IP and port; commands then go to arklet's HTTP API (provider/http_commands.py). `/queryBaseline`
answers the modules of the Pods bound to the base's Node.

Authentication (each optional, any configured one suffices): a bearer token from
--http-tunnel-token-file, sent as `Authorization: Bearer <token>` or, since arklet's heartbeat client
sends no headers, as the first path segment after `/t/` (endpoint `https://<host>:7777/t/<token>`); a
client certificate from --http-tunnel-client-ca.

Several replicas: the Service hands a heartbeat to any of them, and only the holder of the base's
Lease acts on it. A replica that does not hold the Lease takes note of the heartbeat itself (so it
knows the base lives when it has to take over) and forwards it, with a bounded timeout, to the
holder's address, which the holder writes on the Lease. A forwarded heartbeat is never forwarded again.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from prometheus_client import Counter

from koupleless import arklet
from koupleless.http import ReloadingTLS, serve
from provider.bases import BaseRegistry
from provider.http_commands import Stamps
from provider.state import TUNNEL_HTTP, BaseState

log = logging.getLogger(__name__)

HTTP_TUNNEL_REQUESTS = Counter(
    "koupleless_provider_http_tunnel_requests_total",
    "Requests to the HTTP tunnel's heartbeat server, by endpoint and result "
    "(ok, unauthorized, bad_request, internal_error)",
    ["endpoint", "result"],
)
HTTP_TUNNEL_FORWARDS = Counter(
    "koupleless_provider_http_tunnel_forwards_total",
    "Heartbeats forwarded to the replica holding the base's Lease, by result (ok, failed, dropped)",
    ["result"],
)

DEFAULT_PORT = 7777
#: Marks a forwarded heartbeat (its value: the forwarding replica), which is never forwarded again.
FORWARDED_HEADER = "X-Koupleless-Forwarded-By"
#: The base's own address as the first replica saw it, for a heartbeat with no localIP.
BASE_ADDRESS_HEADER = "X-Koupleless-Base-Address"
#: Forwards in flight at once; past this a heartbeat is not forwarded (the next one will be).
MAX_FORWARDS = 256

#: Which modules a base should have (its baseline): a function of its metadata.
Baseline = Callable[[BaseState], list[arklet.BizModel]]


@dataclass(frozen=True)
class HttpTunnelSettings:
    port: int = DEFAULT_PORT
    bind: str = "127.0.0.1"
    #: HOST:PORT the other replicas reach this one at (written on the Leases this replica holds).
    advertise: str = ""
    cert_file: str | None = None
    key_file: str | None = None
    client_ca: str | None = None
    token_file: str | None = None
    forward_timeout: float = 2.0

    @property
    def tls(self) -> bool:
        return bool(self.cert_file)


class Tokens:
    """Bearer tokens, one a line, read again when the file changes (a rotated Secret)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[float, int] | None = None
        self.tokens: list[str] = []
        self.check()
        if not self.tokens:
            raise ValueError(f"--http-tunnel-token-file {path}: no token in it; write one token a line")

    def check(self) -> None:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime, st.st_size)
            if stamp == self._stamp:
                return
            with open(self.path, encoding="utf-8") as f:
                tokens = [line.strip() for line in f if line.strip() and not line.startswith("#")]
        except OSError as exc:
            if self._stamp is None:
                raise ValueError(f"--http-tunnel-token-file {self.path}: {exc.strerror or exc}") from exc
            log.warning("HTTP tunnel tokens: cannot read %s, keeping the current ones: %s", self.path, exc)
            return
        if tokens or self._stamp is None:
            self.tokens = tokens
        self._stamp = stamp

    def valid(self, token: str) -> bool:
        self.check()
        given = token.encode()
        return bool(token) and any(hmac.compare_digest(given, t.encode()) for t in self.tokens)


def forward_target(base: BaseState | None, me: str, forwarded: bool) -> str | None:
    """Where a heartbeat received here should also go: the Lease holder's address, when that is
    another replica and the heartbeat did not come from one (None: handle it here only)."""
    if forwarded or base is None or base.owned:
        return None
    address = base.lease_holder_address
    if not address or address == me:
        return None
    return address


def default_advertise(bind: str, port: int) -> str:
    """HOST:PORT the other replicas forward to: $POD_IP (the manifest sets it), else the bind
    address when it is a single one, else this host's name."""
    host = os.environ.get("POD_IP") or ""
    if not host:
        host = bind if bind not in ("", "0.0.0.0", "::") else socket.gethostname()
    try:
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    except ValueError:
        pass
    return f"{host}:{port}"


class HttpTunnelServer:
    def __init__(self, settings: HttpTunnelSettings, registry: BaseRegistry, stamps: Stamps, *, identity: str,
                 baseline: Baseline) -> None:
        self.settings = settings
        self.registry = registry
        self.stamps = stamps
        self.identity = identity
        self.baseline = baseline
        self.tokens = Tokens(settings.token_file) if settings.token_file else None
        self.tls: ReloadingTLS | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._forwards: set[asyncio.Task[None]] = set()
        self.port = 0

    # --- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Raises OSError / ssl.SSLError / ValueError naming what is wrong (port taken, bad files)."""
        s = self.settings
        if s.cert_file and s.key_file:
            self.tls = ReloadingTLS(s.cert_file, s.key_file)
            if s.client_ca:
                # Optional at the handshake: a replica forwarding a heartbeat, or a base with a
                # token, has no certificate; the request is refused later if nothing vouches for it.
                self.tls.context.verify_mode = ssl.CERT_OPTIONAL
                self.tls.context.load_verify_locations(cafile=s.client_ca)
            self.tls.start()
        try:
            self._runner, self.port = await serve(self.app(), s.bind, s.port, self.tls.context if self.tls else None)
        except BaseException:
            await self.stop()
            raise
        self._session = aiohttp.ClientSession()
        self.registry.http_hearing_since = time.monotonic()
        auth = [what for what, on in (("bearer token", self.tokens), ("client certificate", s.client_ca)) if on]
        log.info("HTTP tunnel: heartbeats on %s://%s:%d/heartbeat (%s); other replicas forward to %s",
                 "https" if self.tls else "http", s.bind, self.port,
                 " or ".join(auth) if auth else "no authentication", s.advertise or "-")
        if not auth and s.bind not in ("127.0.0.1", "::1", "localhost"):
            log.warning("HTTP tunnel on %s without authentication: anyone who reaches it can register a base; "
                        "set --http-tunnel-token-file or --http-tunnel-client-ca", s.bind)
        if s.client_ca and not self.tokens:
            log.warning("HTTP tunnel: with --http-tunnel-client-ca alone, replicas cannot forward heartbeats to "
                        "each other (they hold no base certificate); add --http-tunnel-token-file")

    async def stop(self) -> None:
        self.registry.http_hearing_since = None
        for task in list(self._forwards):
            task.cancel()
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self.tls is not None:
            await self.tls.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=arklet.MAX_PAYLOAD_BYTES)
        for prefix in ("", "/t/{token}"):
            app.router.add_post(prefix + "/heartbeat", self._heartbeat)
            app.router.add_post(prefix + "/queryBaseline", self._query_baseline)
        return app

    # --- requests -------------------------------------------------------------------------------------

    def _authorized(self, request: web.Request) -> bool:
        if self.tokens is None and not self.settings.client_ca:
            return True
        if self.settings.client_ca and request.transport is not None:
            sslobj = request.transport.get_extra_info("ssl_object")
            if sslobj is not None and sslobj.getpeercert():
                return True  # verified against the client CA at the handshake
        if self.tokens is not None:
            token = request.match_info.get("token", "")
            header = request.headers.get("Authorization", "")
            if header[:7].lower() == "bearer ":
                token = header[7:].strip()
            return self.tokens.valid(token)
        return False

    def _refuse(self, endpoint: str) -> web.Response:
        HTTP_TUNNEL_REQUESTS.labels(endpoint, "unauthorized").inc()
        how = []
        if self.tokens is not None:
            how.append("a token from --http-tunnel-token-file (Authorization: Bearer <token>, or an endpoint "
                       "ending in /t/<token>)")
        if self.settings.client_ca:
            how.append("a client certificate from --http-tunnel-client-ca")
        return web.Response(status=401, text="unauthorized: send " + " or ".join(how) + "\n")

    async def _read(self, request: web.Request, endpoint: str) -> Any:
        try:
            return arklet.decode_json(await request.read())
        except arklet.ArkletError:
            raise
        except web.HTTPRequestEntityTooLarge:
            raise arklet.ArkletError("too_large", "body", f"over the {arklet.MAX_PAYLOAD_BYTES} byte limit",
                                     f"POST a BaseStatus JSON object to /{endpoint}") from None

    def _bad(self, endpoint: str, exc: arklet.ArkletError, request: web.Request) -> web.Response:
        HTTP_TUNNEL_REQUESTS.labels(endpoint, "bad_request").inc()
        log.warning("HTTP tunnel /%s from %s refused: %s", endpoint, request.remote, ascii(str(exc)[:500]))
        return web.Response(status=400, text=f"{exc}\n")

    async def _heartbeat(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._refuse("heartbeat")
        try:
            data = await self._read(request, "heartbeat")
            if isinstance(data, dict) and not data.get("localIP"):
                # Without localIP the base cannot be called; the address it came from is the next best.
                data = {**data, "localIP": request.headers.get(BASE_ADDRESS_HEADER) or request.remote or ""}
            forwarded = request.headers.get(FORWARDED_HEADER)
            ts = self.stamps.next(_identity(data))
            self.registry.receive(arklet.HEART, data, ts, tunnel=TUNNEL_HTTP)
        except arklet.ArkletError as exc:
            return self._bad("heartbeat", exc, request)
        except Exception:  # a bug must not take the server down; the base tries again in 12 s
            HTTP_TUNNEL_REQUESTS.labels("heartbeat", "internal_error").inc()
            log.exception("HTTP tunnel heartbeat from %s", request.remote)
            return web.Response(status=500, text="internal error; see the provider's log\n")
        base = self.registry.get(_identity(data))
        target = forward_target(base, self.settings.advertise, forwarded is not None)
        if target is not None:
            self._forward(target, request, data)
        HTTP_TUNNEL_REQUESTS.labels("heartbeat", "ok").inc()
        return web.Response(text="SUCCESS")

    async def _query_baseline(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._refuse("queryBaseline")
        try:
            meta = await self._read(request, "queryBaseline")
            identity = meta.get("identity") if isinstance(meta, dict) else None
            if not isinstance(identity, str) or not identity:
                raise arklet.ArkletError("wrong_type", "body.identity", "is missing",
                                         "POST the base's BaseMetadata {identity, name, version, clusterName}")
        except arklet.ArkletError as exc:
            return self._bad("queryBaseline", exc, request)
        base = self.registry.get(identity)
        models = self.baseline(base) if base is not None else []
        HTTP_TUNNEL_REQUESTS.labels("queryBaseline", "ok").inc()
        return web.json_response([m.to_wire() for m in models])

    # --- forwarding -------------------------------------------------------------------------------------

    def _forward(self, address: str, request: web.Request, data: Any) -> None:
        if self._session is None or len(self._forwards) >= MAX_FORWARDS:
            HTTP_TUNNEL_FORWARDS.labels("dropped").inc()
            return
        headers = {FORWARDED_HEADER: self.identity, "Content-Type": "application/json",
                   BASE_ADDRESS_HEADER: str(data.get("localIP") or "")}
        if self.tokens is not None:
            headers["Authorization"] = f"Bearer {self.tokens.tokens[0]}"
        url = f"{'https' if self.tls else 'http'}://{address}/heartbeat"
        task = asyncio.get_running_loop().create_task(self._post(url, headers, data))
        self._forwards.add(task)
        task.add_done_callback(self._forwards.discard)

    async def _post(self, url: str, headers: dict[str, str], data: Any) -> None:
        assert self._session is not None
        try:
            async with self._session.post(url, data=orjson.dumps(data),
                                          headers=headers, ssl=self._peer_ssl(),
                                          timeout=aiohttp.ClientTimeout(total=self.settings.forward_timeout)) as resp:
                if resp.status != 200:
                    raise aiohttp.ClientResponseError(resp.request_info, (), status=resp.status,
                                                      message=(await resp.text())[:200])
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            HTTP_TUNNEL_FORWARDS.labels("failed").inc()
            log.warning("forwarding a heartbeat to the Lease holder at %s failed: %s", url, exc or type(exc).__name__)
            return
        HTTP_TUNNEL_FORWARDS.labels("ok").inc()

    def _peer_ssl(self) -> aiohttp.Fingerprint | bool:
        """Replicas are reached by Pod IP, which their certificate does not name: instead the holder
        must present exactly this replica's own serving certificate (all replicas mount one Secret)."""
        if not self.settings.cert_file:
            return True
        return aiohttp.Fingerprint(hashlib.sha256(ssl.PEM_cert_to_DER_cert(_first_pem(self.settings.cert_file))).digest())


def _identity(data: Any) -> str:
    meta = data.get("baseMetadata") if isinstance(data, dict) else None
    identity = meta.get("identity") if isinstance(meta, dict) else None
    return identity if isinstance(identity, str) else ""


def _first_pem(path: str) -> str:
    with open(path, encoding="ascii") as f:
        text = f.read()
    end = "-----END CERTIFICATE-----"
    return text[: text.index(end) + len(end)] + "\n"
