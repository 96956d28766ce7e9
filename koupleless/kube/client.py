"""A small asyncio client for the Kubernetes REST API over aiohttp; objects are plain dicts (orjson).

Generated model classes are about ten times slower to decode than raw JSON (reference
python-ecosystem.md §1.2), and caches here hold thousands of Pods, so everything stays a dict.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any, Literal
from urllib.parse import quote

import aiohttp
import orjson

from koupleless.kube import metrics
from koupleless.kube.config import KubeConfig, load_config

log = logging.getLogger(__name__)

PatchType = Literal["merge", "strategic", "json", "apply"]

PATCH_CONTENT_TYPES: dict[str, str] = {
    "merge": "application/merge-patch+json",
    "strategic": "application/strategic-merge-patch+json",
    "json": "application/json-patch+json",
    "apply": "application/apply-patch+yaml",
}

#: Verbs that may be sent twice without changing the outcome: safe to retry after a lost response.
IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
REPLAYABLE_PATCHES = frozenset(
    {PATCH_CONTENT_TYPES["merge"], PATCH_CONTENT_TYPES["strategic"], PATCH_CONTENT_TYPES["apply"]}
)
LIST_PAGE_SIZE = 500


class ApiError(Exception):
    """A non-expected answer from the API server, parsed from its `Status` body.

    `status` is the HTTP code, or 0 when no answer arrived (connection refused, timed out).
    """

    def __init__(self, status: int, reason: str, message: str, body: dict[str, Any] | None = None) -> None:
        self.status = status
        self.reason = reason
        self.message = message
        self.body: dict[str, Any] = body or {}
        super().__init__(f"{status} {reason}: {message}" if status else f"{reason}: {message}")

    @classmethod
    def from_response(cls, status: int, raw: bytes, method: str, url: str) -> ApiError:
        body: dict[str, Any] = {}
        try:
            decoded = orjson.loads(raw) if raw else {}
            if isinstance(decoded, dict):
                body = decoded
        except orjson.JSONDecodeError:
            pass
        reason = str(body.get("reason") or _REASONS.get(status, "Unknown"))
        message = str(body.get("message") or raw[:500].decode(errors="replace").strip() or f"{method} {url}")
        return cls(status, reason, message, body)

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def conflict(self) -> bool:
        return self.status == 409

    @property
    def gone(self) -> bool:
        return self.status == 410

    @property
    def already_exists(self) -> bool:
        return self.status == 409 and self.reason == "AlreadyExists"


_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Expired",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


class WatchDecodeError(Exception):
    """A watch line that is not a JSON event; the stream cannot be trusted past it."""


# --- paths --------------------------------------------------------------------------------------


def _q(name: str) -> str:
    return quote(name, safe="")


def resource_path(group_version: str, plural: str, namespace: str | None = None, name: str | None = None) -> str:
    """`("v1", "pods", "ns", "p")` -> `/api/v1/namespaces/ns/pods/p`; groups go under `/apis/`."""
    root = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
    path = f"{root}/namespaces/{_q(namespace)}/{plural}" if namespace else f"{root}/{plural}"
    return f"{path}/{_q(name)}" if name else path


def pod_path(namespace: str | None = None, name: str | None = None) -> str:
    """Pods in `namespace`, or in every namespace when it is None."""
    return resource_path("v1", "pods", namespace, name)


def node_path(name: str | None = None) -> str:
    return resource_path("v1", "nodes", None, name)


def lease_path(namespace: str, name: str | None = None) -> str:
    return resource_path("coordination.k8s.io/v1", "leases", namespace, name)


def event_path(namespace: str | None, name: str | None = None) -> str:
    return resource_path("v1", "events", namespace, name)


def namespace_path(name: str | None = None) -> str:
    return resource_path("v1", "namespaces", None, name)


# --- line splitting for watch streams -----------------------------------------------------------


class LineSplitter:
    """Cuts a byte stream into newline-terminated lines of any length.

    aiohttp's `readline` refuses lines over its buffer size ("Line is too long"), and a single
    watch event can be megabytes, so chunks are split here instead.
    """

    def __init__(self) -> None:
        self._pending = bytearray()

    def feed(self, chunk: bytes) -> list[bytes]:
        if b"\n" not in chunk:
            self._pending += chunk
            return []
        self._pending += chunk
        *lines, rest = bytes(self._pending).split(b"\n")
        self._pending = bytearray(rest)
        return [line for line in lines if line.strip()]

    def rest(self) -> bytes:
        """What is left after the stream ended without a final newline."""
        out = bytes(self._pending)
        self._pending.clear()
        return out if out.strip() else b""


# --- rate limiting ------------------------------------------------------------------------------


class TokenBucket:
    """client-go's default limiter shape: `qps` sustained, `burst` at once; callers queue in order."""

    def __init__(self, qps: float, burst: int) -> None:
        self.qps = qps
        self.burst = max(1, burst)
        self._tokens = float(self.burst)
        self._stamp = time.monotonic()

    def reserve(self) -> float:
        """Take one token; return how long the caller must wait before using it."""
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.qps)
        self._stamp = now
        self._tokens -= 1
        return 0.0 if self._tokens >= 0 else -self._tokens / self.qps

    async def acquire(self) -> None:
        delay = self.reserve()
        if delay > 0:
            await asyncio.sleep(delay)


def _encode_params(params: Mapping[str, Any] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in (params or {}).items():
        if value is None:
            continue
        out[key] = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return out


def backoff_delay(attempt: int, base: float = 0.2, cap: float = 5.0) -> float:
    """Exponential backoff with full jitter, so many clients restarting together spread out."""
    return random.uniform(0, min(cap, base * (2**attempt)))


class KubeClient:
    """Talks to one API server. Create it inside the event loop that uses it; `close()` when done."""

    #: How often a bearer-token file is checked for a rotated token.
    token_recheck_seconds = 5.0

    def __init__(
        self,
        config: KubeConfig,
        *,
        user_agent: str = "koupleless-module-controller",
        qps: float | None = 100.0,
        burst: int = 200,
        timeout: float = 30.0,
        retries: int = 4,
    ) -> None:
        self.config = config
        self.user_agent = user_agent
        self.timeout = timeout
        self.retries = retries
        self._limiter = TokenBucket(qps, burst) if qps else None
        # Paced requests (behind the limiter) share a pool of about qps/8 connections: on a healthy
        # API server each takes well under 125 ms, so that many carry the whole paced rate. HTTP/1.1
        # has one request in flight per connection, and with no cap a burst (a fleet of new bases)
        # opened one per request in flight: a TLS handshake on both sides each, a fifth of the
        # provider's CPU in a 200-base registration. Watches hold their connection for minutes,
        # and unpaced requests (Lease renewals) must never wait for one: they have a pool of
        # their own, without a cap.
        self.max_paced_connections = max(8, math.ceil(qps / 8)) if qps else 0
        self._session: aiohttp.ClientSession | None = None
        self._unpaced_session: aiohttp.ClientSession | None = None
        self._headers = {**config.headers, "User-Agent": user_agent, "Accept": "application/json"}
        self._token_stamp: tuple[float, int] | None = None
        self._token_checked = 0.0
        if config.token_file:
            self._token_stamp = self._stat_token_file()

    @classmethod
    def from_kubeconfig(
        cls, kubeconfig: str | None = None, context: str | None = None, **kwargs: Any
    ) -> KubeClient:
        return cls(load_config(kubeconfig, context), **kwargs)

    async def __aenter__(self) -> KubeClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    @property
    def namespace(self) -> str:
        return self.config.namespace

    def _session_for_loop(self, *, paced: bool = True) -> aiohttp.ClientSession:
        if not paced:
            if self._unpaced_session is None or self._unpaced_session.closed:
                self._unpaced_session = self._new_session(limit=0)
            return self._unpaced_session
        if self._session is None or self._session.closed:
            self._session = self._new_session(limit=self.max_paced_connections)
        return self._session

    def _new_session(self, *, limit: int) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(ssl=self.config.ssl_context, limit=limit, enable_cleanup_closed=True)
        return aiohttp.ClientSession(connector=connector, raise_for_status=False)

    async def close(self) -> None:
        for session in (self._session, self._unpaced_session):
            if session is not None:
                await session.close()
        self._session = self._unpaced_session = None

    # --- auth -----------------------------------------------------------------------------------

    def _stat_token_file(self) -> tuple[float, int] | None:
        try:
            st = os.stat(self.config.token_file or "")
        except OSError:
            return None
        return (st.st_mtime, st.st_size)

    def _refresh_token(self) -> None:
        """Projected service-account tokens rotate under a running process; pick up the new one
        (checked at most every few seconds)."""
        now = time.monotonic()
        if not self.config.token_file or now - self._token_checked < self.token_recheck_seconds:
            return
        self._token_checked = now
        stamp = self._stat_token_file()
        if stamp is None or stamp == self._token_stamp:
            return
        try:
            with open(self.config.token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as exc:
            log.warning("cannot re-read token file %s, keeping the old token: %s", self.config.token_file, exc)
            return
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
            self._token_stamp = stamp
            log.info("reloaded bearer token from %s", self.config.token_file)

    # --- requests -------------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        content_type: str | None = None,
        expected: tuple[int, ...] = (200, 201),
        limited: bool = True,
    ) -> dict[str, Any]:
        """One API call; the decoded JSON answer, or ApiError for any status not in `expected`.

        Connection failures are retried with jittered backoff when the verb is idempotent or the
        request never left (connect failed); 429 is retried for every verb, after `Retry-After`.
        `limited=False` skips the client's rate limiter: for requests whose rate is bounded by
        something else and that must not wait behind the rest (Lease renewals, one per base per
        renewal interval, as each kubelet renews its own); kube-apiserver's own flow control
        still applies.
        """
        method = method.upper()
        # Merge, strategic and apply patches give the same result when applied twice, so a PATCH
        # whose answer was lost may be re-sent; a JSON patch (e.g. "add to /-") may not.
        replayable = method in IDEMPOTENT or (method == "PATCH" and content_type in REPLAYABLE_PATCHES)
        url = self.config.server + path
        body = orjson.dumps(json) if json is not None else None
        query = _encode_params(params)
        attempt = 0
        while True:
            self._refresh_token()
            headers = dict(self._headers)
            if body is not None:
                headers["Content-Type"] = content_type or "application/json"
            if self._limiter and limited:
                await self._limiter.acquire()
            started = time.monotonic()
            try:
                session = self._session_for_loop(paced=limited)
                async with session.request(
                    method,
                    url,
                    params=query,
                    data=body,
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=self.timeout, sock_connect=min(10.0, self.timeout)),
                    server_hostname=self.config.tls_server_name,
                ) as resp:
                    raw = await resp.read()
                    status = resp.status
                    retry_after = resp.headers.get("Retry-After")
            except (aiohttp.ClientError, TimeoutError) as exc:
                metrics.REQUESTS.labels(method, "0").inc()
                never_sent = isinstance(exc, aiohttp.ClientConnectorError)
                if attempt < self.retries and (replayable or never_sent):
                    reason = "timeout" if isinstance(exc, TimeoutError) else "connection"
                    metrics.REQUEST_RETRIES.labels(method, reason).inc()
                    delay = backoff_delay(attempt)
                    log.debug("%s %s failed (%s), retry %d in %.2fs", method, path, exc, attempt + 1, delay)
                    attempt += 1
                    await asyncio.sleep(delay)
                    continue
                detail = str(exc) or type(exc).__name__
                raise ApiError(0, "ConnectionError", f"{method} {url}: {detail}") from exc
            metrics.REQUESTS.labels(method, str(status)).inc()
            metrics.REQUEST_SECONDS.labels(method).observe(time.monotonic() - started)
            if status in expected:
                return orjson.loads(raw) if raw else {}
            # 429: the request was not processed. 5xx with Retry-After: the apiserver asks us to come
            # back (starting up, overloaded); only safe for requests that may be replayed.
            throttled = status == 429 or (status >= 500 and retry_after is not None and replayable)
            if throttled and attempt < self.retries:
                metrics.REQUEST_RETRIES.labels(method, "throttled").inc()
                attempt += 1
                await asyncio.sleep(_retry_after(retry_after, attempt))
                continue
            raise ApiError.from_response(status, raw, method, path)

    async def get(self, path: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return await self.request("GET", path, params=params)

    async def create(self, path: str, obj: Any, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return await self.request("POST", path, json=obj, params=params, expected=(200, 201, 202))

    async def replace(self, path: str, obj: Any, params: Mapping[str, Any] | None = None, *,
                      limited: bool = True) -> dict[str, Any]:
        return await self.request("PUT", path, json=obj, params=params, expected=(200, 201), limited=limited)

    async def patch(
        self,
        path: str,
        body: Any,
        patch_type: PatchType = "merge",
        subresource: str | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """PATCH `path` (or `path/subresource`, e.g. "status"). `apply` needs params={"fieldManager": ...}."""
        try:
            content_type = PATCH_CONTENT_TYPES[patch_type]
        except KeyError:
            raise ValueError(f"patch_type {patch_type!r}: use one of {', '.join(PATCH_CONTENT_TYPES)}") from None
        target = f"{path}/{subresource}" if subresource else path
        return await self.request("PATCH", target, json=body, content_type=content_type, params=params)

    async def delete(
        self,
        path: str,
        *,
        grace_period_seconds: int | None = None,
        preconditions_uid: str | None = None,
        propagation_policy: str | None = None,
    ) -> dict[str, Any] | None:
        """DELETE; None when the object is already gone (404). A UID precondition that no longer
        matches (the name was re-created) raises ApiError 409."""
        options: dict[str, Any] = {"kind": "DeleteOptions", "apiVersion": "v1"}
        if grace_period_seconds is not None:
            options["gracePeriodSeconds"] = grace_period_seconds
        if preconditions_uid:
            options["preconditions"] = {"uid": preconditions_uid}
        if propagation_policy:
            options["propagationPolicy"] = propagation_policy
        try:
            return await self.request("DELETE", path, json=options, expected=(200, 202))
        except ApiError as exc:
            if exc.not_found:
                return None
            raise

    async def list(self, path: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """All items across pages (`limit`/`continue`); the result's resourceVersion is the list's.

        If a continue token expires mid-way (410), the list starts over once without paging,
        as client-go does.
        """
        base = dict(params or {})
        page_params = {"limit": LIST_PAGE_SIZE, **base}
        items: list[dict[str, Any]] = []
        first: dict[str, Any] | None = None
        while True:
            try:
                page = await self.get(path, page_params)
            except ApiError as exc:
                if exc.gone and "continue" in page_params:
                    log.info("list %s: continue token expired, listing again in one page", path)
                    page = await self.get(path, {k: v for k, v in base.items() if k != "limit"})
                    items, first = [], None
                    page.setdefault("metadata", {}).pop("continue", None)
                else:
                    raise
            if first is None:
                first = page
            items.extend(page.get("items") or [])
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                break
            page_params["continue"] = token
        meta = first.get("metadata") or {}
        # List items come without kind/apiVersion; restore them so every cached object (and the
        # Event recorder's involvedObject) can say what it is.
        kind = str(first.get("kind", ""))
        if kind.endswith("List") and kind != "List":
            item_kind, api_version = kind[: -len("List")], first.get("apiVersion", "")
            for item in items:
                item.setdefault("kind", item_kind)
                item.setdefault("apiVersion", api_version)
        return {
            "kind": first.get("kind", ""),
            "apiVersion": first.get("apiVersion", ""),
            "metadata": {"resourceVersion": meta.get("resourceVersion", "")},
            "items": items,
        }

    async def watch_stream(self, path: str, params: Mapping[str, Any] | None = None) -> AsyncIterator[dict[str, Any]]:
        """Yield watch events (`{"type": ..., "object": {...}}`) until the server ends the stream.

        HTTP errors on connect raise ApiError (410 included: the caller must relist); a line that is
        not JSON raises WatchDecodeError. A read timeout slightly above `timeoutSeconds` catches a
        connection that died silently.
        """
        query = _encode_params({**(params or {}), "watch": True})
        server_timeout = float(query["timeoutSeconds"]) if "timeoutSeconds" in query else None
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=10.0, sock_read=server_timeout + 30.0 if server_timeout else None
        )
        self._refresh_token()
        if self._limiter:
            await self._limiter.acquire()
        session = self._session_for_loop(paced=False)
        try:
            resp = await session.get(
                self.config.server + path,
                params=query,
                headers=self._headers,
                timeout=timeout,
                server_hostname=self.config.tls_server_name,
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            metrics.REQUESTS.labels("WATCH", "0").inc()
            raise ApiError(0, "ConnectionError", f"watch {path}: {exc or type(exc).__name__}") from exc
        async with resp:
            metrics.REQUESTS.labels("WATCH", str(resp.status)).inc()
            if resp.status != 200:
                raise ApiError.from_response(resp.status, await resp.read(), "GET", path)
            splitter = LineSplitter()
            async for chunk in resp.content.iter_any():
                for line in splitter.feed(chunk):
                    yield _decode_event(line, path)
            tail = splitter.rest()
            if tail:
                try:
                    yield _decode_event(tail, path)
                except WatchDecodeError:
                    # The server closed mid-event; the caller resumes from the last complete event.
                    log.debug("watch %s ended inside an event (%d bytes dropped)", path, len(tail))


def _decode_event(line: bytes, path: str) -> dict[str, Any]:
    try:
        event = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise WatchDecodeError(f"watch {path}: line is not JSON ({exc}): {line[:200]!r}") from exc
    if not isinstance(event, dict) or "type" not in event:
        raise WatchDecodeError(f"watch {path}: expected {{type, object}}, got {line[:200]!r}")
    return event


def _retry_after(header: str | None, attempt: int) -> float:
    try:
        return min(10.0, max(0.0, float(header))) if header else backoff_delay(attempt, base=0.5)
    except ValueError:
        return backoff_delay(attempt, base=0.5)
