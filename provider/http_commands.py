"""Commands to bases on arklet's HTTP tunnel: `POST http://<base IP>:<arklet port>/<command>`.

arklet answers each call synchronously with `{code, message, data, errorStackTrace, baseIdentity}`
(reference §3.2). Each answer is handed to the registry as the MQTT message it stands for, so the
rest of the provider sees one kind of base: installBiz / uninstallBiz as a bizOperation, queryAllBiz
as base/biz, health as base/health. A call that fails (refused, timed out, not HTTP 200, not arklet's
answer) is a lost message: the reconciler's retries and the next inventory put it right.

Every call runs in its own task, with a timeout, under a bound per base and one overall, so a hung
or slow base holds up nothing but its own calls; a base with too many calls waiting gets no more
(the command is dropped, as by a full MQTT outbox, and sent again by whoever still wants it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from prometheus_client import Counter

from koupleless import arklet
from provider.bases import BaseRegistry
from provider.state import TUNNEL_HTTP, BaseState

log = logging.getLogger(__name__)

HTTP_CALLS = Counter(
    "koupleless_provider_http_calls_total",
    "Calls to bases' arklet HTTP API, by command and result (ok, refused, timeout, http_error, bad_reply, dropped)",
    ["command", "result"],
)

#: Called with (base, command, model, why) when a call got no usable answer.
CallFailed = Callable[[BaseState, str, "arklet.BizModel | None", str], None]


@dataclass(frozen=True)
class HttpCallOptions:
    #: installBiz / uninstallBiz: a real install downloads and starts a jar (seconds to minutes).
    operation_timeout: float = 120.0
    #: queryAllBiz / health answer from memory.
    query_timeout: float = 10.0
    connect_timeout: float = 5.0
    #: Calls in flight to one base, and to all of them.
    per_base: int = 4
    total: int = 256
    #: Calls waiting for one base beyond which new ones are dropped.
    backlog: int = 64


class Stamps:
    """The HTTP tunnel carries no base timestamps: its messages are ordered by this provider's
    clock, strictly increasing per base (two calls answered in one millisecond stay ordered)."""

    def __init__(self) -> None:
        self._last: dict[str, int] = {}

    def next(self, base_id: str) -> int:
        ts = max(arklet.now_ms(), self._last.get(base_id, 0) + 1)
        self._last[base_id] = ts
        return ts

    def forget(self, base_id: str) -> None:
        self._last.pop(base_id, None)


class HttpCommands:
    def __init__(self, registry: BaseRegistry, stamps: Stamps, on_failed: CallFailed,
                 opts: HttpCallOptions | None = None) -> None:
        self.registry = registry
        self.stamps = stamps
        self.on_failed = on_failed
        self.opts = opts or HttpCallOptions()
        self._session: aiohttp.ClientSession | None = None
        self._overall = asyncio.Semaphore(self.opts.total)
        self._per_base: dict[str, asyncio.Semaphore] = {}
        self._waiting: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        # No pooling limits of its own (the semaphores bound it); keep-alive to each base.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=0),
            headers={"Content-Type": "application/json"},
        )

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    def send(self, base: BaseState, command: str, model: arklet.BizModel | None = None) -> bool:
        """Start one call; False (dropped) when the base already has `backlog` calls waiting."""
        if self._session is None:
            return False
        if self._waiting.get(base.base_id, 0) >= self.opts.backlog:
            HTTP_CALLS.labels(command, "dropped").inc()
            return False
        self._waiting[base.base_id] = self._waiting.get(base.base_id, 0) + 1
        task = asyncio.get_running_loop().create_task(self._call(base, command, model),
                                                      name=f"arklet-http-{command}-{base.base_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    def in_flight(self, base_id: str) -> int:
        return self._waiting.get(base_id, 0)

    async def _call(self, base: BaseState, command: str, model: arklet.BizModel | None) -> None:
        try:
            sem = self._per_base.setdefault(base.base_id, asyncio.Semaphore(self.opts.per_base))
            async with sem, self._overall:
                await self._call_now(base, command, model)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug here must not end the provider; the call counts as lost
            log.exception("HTTP %s to base %s failed", command, base.base_id)
            HTTP_CALLS.labels(command, "internal_error").inc()
        finally:
            left = self._waiting.get(base.base_id, 1) - 1
            if left <= 0:
                self._waiting.pop(base.base_id, None)
                self._per_base.pop(base.base_id, None)
            else:
                self._waiting[base.base_id] = left

    async def _call_now(self, base: BaseState, command: str, model: arklet.BizModel | None) -> None:
        assert self._session is not None
        url = f"http://{_host(base.ip)}:{base.tunnel_port}/{command}"
        operation = command in (arklet.CMD_INSTALL_BIZ, arklet.CMD_UNINSTALL_BIZ)
        timeout = aiohttp.ClientTimeout(
            total=self.opts.operation_timeout if operation else self.opts.query_timeout,
            sock_connect=self.opts.connect_timeout,
        )
        sent_ts = self.stamps.next(base.base_id)
        try:
            async with self._session.post(url, data=arklet.encode_command(model), timeout=timeout,
                                          allow_redirects=False) as resp:
                body = await resp.content.read(arklet.MAX_PAYLOAD_BYTES + 1)
                if resp.status != 200:
                    text = body[:300].decode("utf-8", "replace").strip()
                    return self._failed(base, command, model, "http_error",
                                        f"{url} answered HTTP {resp.status}{': ' + text if text else ''}")
        except TimeoutError:
            return self._failed(base, command, model, "timeout",
                                f"{url} did not answer within {timeout.total:g}s")
        except aiohttp.ClientError as exc:
            return self._failed(base, command, model, "refused",
                                f"{url}: {exc or type(exc).__name__}; is arklet's HTTP tunnel listening there "
                                "(the base's heartbeat names the IP and port)?")
        reply_ts = self.stamps.next(base.base_id)
        if self.registry.get(base.base_id) is not base or base.tunnel != TUNNEL_HTTP:
            return  # forgotten, or moved to MQTT, while the call was out: nobody waits for this
        try:
            doc = arklet.decode_json(body)
            if not isinstance(doc, dict):
                raise arklet.ArkletError("wrong_type", "body", f"expected an object, got {type(doc).__name__}",
                                         "answer {code, message, data}")
            identity = doc.get("baseIdentity")
            if isinstance(identity, str) and identity and identity != base.base_id:
                raise arklet.ArkletError(
                    "identity_mismatch", "body.baseIdentity",
                    f"{identity!r} answered at {base.ip}:{base.tunnel_port}, where base {base.base_id!r} heartbeats "
                    "from", "give every base its own IP:port (an address reused by another base?)")
            self._deliver(base, command, model, doc, sent_ts, reply_ts)
        except arklet.ArkletError as exc:
            return self._failed(base, command, model, "bad_reply", f"{url} answered something that is not "
                                f"arklet's reply: {exc}")
        HTTP_CALLS.labels(command, "ok").inc()

    def _deliver(self, base: BaseState, command: str, model: arklet.BizModel | None, doc: dict[str, Any],
                 sent_ts: int, reply_ts: int) -> None:
        if command in (arklet.CMD_INSTALL_BIZ, arklet.CMD_UNINSTALL_BIZ):
            assert model is not None
            # The same bizOperation arklet publishes over MQTT: the request echoed, the answer inside.
            # Dated by its arrival: the operation is done by the time its answer is here.
            data = {"command": command, "bizName": model.biz_name, "bizVersion": model.biz_version, "response": doc}
            self.registry.receive(arklet.BIZ_OPERATION, data, reply_ts, base_id=base.base_id)
        elif command == arklet.CMD_QUERY_ALL_BIZ:
            # Dated by the request: the list may be from any moment the call was out, and an
            # install answered meanwhile is newer than it.
            self.registry.receive(arklet.BIZ, doc, sent_ts, base_id=base.base_id)
        elif command == arklet.CMD_HEALTH:
            self.registry.receive(arklet.BASE_HEALTH, doc, sent_ts, base_id=base.base_id)

    def _failed(self, base: BaseState, command: str, model: arklet.BizModel | None, result: str, why: str) -> None:
        HTTP_CALLS.labels(command, result).inc()
        log.warning("%s to base %s: %s", command, base.base_id, why)
        if self.registry.get(base.base_id) is base:
            self.on_failed(base, command, model, why)


def _host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip
