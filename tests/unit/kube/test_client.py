"""The REST client's wire behaviour: watch lines split across any chunk boundary, events larger
than aiohttp's line limit, pagination, Status errors, retries. Served by a local aiohttp app that
replays recorded apiserver bodies (the e2e tests use the real apiserver)."""

from __future__ import annotations

import asyncio
import itertools
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from koupleless.kube.client import (
    ApiError,
    KubeClient,
    LineSplitter,
    TokenBucket,
    WatchDecodeError,
    lease_path,
    node_path,
    pod_path,
    resource_path,
)
from koupleless.kube.config import KubeConfig

DATA = Path(__file__).parent / "data"
WATCH_BODY = (DATA / "pod_watch.jsonl").read_bytes()
LINES = [line for line in WATCH_BODY.split(b"\n") if line]


def test_paths() -> None:
    assert pod_path() == "/api/v1/pods"
    assert pod_path("ns") == "/api/v1/namespaces/ns/pods"
    assert pod_path("ns", "p") == "/api/v1/namespaces/ns/pods/p"
    assert node_path("virtual-node-a") == "/api/v1/nodes/virtual-node-a"
    assert lease_path("kube-node-lease", "vn") == "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/vn"
    assert resource_path("apps/v1", "deployments", "ns") == "/apis/apps/v1/namespaces/ns/deployments"


# --- line splitting -------------------------------------------------------------------------------


@given(st.lists(st.integers(min_value=0, max_value=len(WATCH_BODY)), max_size=40))
def test_splitter_reassembles_lines_cut_anywhere(cuts: list[int]) -> None:
    bounds = sorted({0, len(WATCH_BODY), *cuts})
    splitter = LineSplitter()
    out: list[bytes] = []
    for start, end in itertools.pairwise(bounds):
        out += splitter.feed(WATCH_BODY[start:end])
    assert out == LINES
    assert splitter.rest() == b""


def test_splitter_keeps_an_unterminated_tail_and_skips_blank_lines() -> None:
    splitter = LineSplitter()
    assert splitter.feed(b'{"a":1}\n\n  \n{"b"') == [b'{"a":1}']
    assert splitter.feed(b":2}") == []
    assert splitter.rest() == b'{"b":2}'
    assert splitter.rest() == b""


def test_splitter_handles_a_line_of_several_megabytes() -> None:
    big = b'{"type":"ADDED","object":{"data":"' + b"x" * (5 << 20) + b'"}}'
    splitter = LineSplitter()
    out: list[bytes] = []
    for i in range(0, len(big), 65536):
        out += splitter.feed(big[i : i + 65536])
    out += splitter.feed(b"\n")
    assert out == [big]


# --- against a local HTTP server ------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[dict[str, Handler]], Awaitable[KubeClient]]]:
    runners: list[web.AppRunner] = []
    clients: list[KubeClient] = []

    async def start(routes: dict[str, Handler]) -> KubeClient:
        app = web.Application()
        for route, handler in routes.items():
            method, path = route.split(" ", 1)
            app.router.add_route(method, path, handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        config = KubeConfig(server=f"http://127.0.0.1:{port}", ssl_context=ssl.create_default_context(),
                            headers={"Authorization": "Bearer t"})
        client = KubeClient(config, qps=None, retries=3)
        clients.append(client)
        return client

    yield start
    for c in clients:
        await c.close()
    for r in runners:
        await r.cleanup()


def stream_in_chunks(body: bytes, chunk: int) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        assert request.query["watch"] == "true"
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        for i in range(0, len(body), chunk):
            await resp.write(body[i : i + chunk])
        await resp.write_eof()
        return resp

    return handler


@pytest.mark.parametrize("chunk", [1, 7, 4096, 1 << 20])
async def test_watch_stream_yields_every_recorded_event(serve: Any, chunk: int) -> None:
    client = await serve({"GET /api/v1/pods": stream_in_chunks(WATCH_BODY, chunk)})
    events = [e async for e in client.watch_stream("/api/v1/pods", {"resourceVersion": "1"})]
    assert [e["type"] for e in events] == ["MODIFIED", "ADDED", "MODIFIED", "DELETED", "BOOKMARK"]


async def test_watch_event_bigger_than_aiohttp_line_limit(serve: Any) -> None:
    big = orjson.dumps({"type": "ADDED", "object": {"kind": "ConfigMap", "data": {"k": "v" * (3 << 20)}}}) + b"\n"
    client = await serve({"GET /api/v1/configmaps": stream_in_chunks(big, 1 << 16)})
    events = [e async for e in client.watch_stream("/api/v1/configmaps")]
    assert len(events[0]["object"]["data"]["k"]) == 3 << 20


async def test_watch_garbage_line_raises_decode_error(serve: Any) -> None:
    client = await serve({"GET /api/v1/pods": stream_in_chunks(LINES[0] + b"\n<html>proxy error</html>\n", 50)})
    seen = []
    with pytest.raises(WatchDecodeError, match="line is not JSON"):
        async for event in client.watch_stream("/api/v1/pods"):
            seen.append(event)
    assert len(seen) == 1


async def test_watch_410_on_connect_is_an_api_error(serve: Any) -> None:
    async def gone(_: web.Request) -> web.Response:
        status = {"kind": "Status", "status": "Failure", "reason": "Expired", "code": 410,
                  "message": "too old resource version: 1 (900)"}
        return web.json_response(status, status=410)

    client = await serve({"GET /api/v1/pods": gone})
    with pytest.raises(ApiError) as info:
        async for _ in client.watch_stream("/api/v1/pods", {"resourceVersion": "1"}):
            pass
    assert info.value.gone and info.value.reason == "Expired" and "too old" in info.value.message


async def test_status_errors_are_parsed(serve: Any) -> None:
    async def conflict(_: web.Request) -> web.Response:
        body = {"kind": "Status", "status": "Failure", "reason": "AlreadyExists", "code": 409,
                "message": 'pods "p" already exists', "details": {"name": "p", "kind": "pods"}}
        return web.json_response(body, status=409)

    client = await serve({"POST /api/v1/namespaces/ns/pods": conflict})
    with pytest.raises(ApiError) as info:
        await client.create(pod_path("ns"), {"metadata": {"name": "p"}})
    err = info.value
    assert (err.status, err.reason, err.message) == (409, "AlreadyExists", 'pods "p" already exists')
    assert err.already_exists and err.body["details"]["name"] == "p"


async def test_non_json_error_body_still_says_something(serve: Any) -> None:
    async def bad_gateway(_: web.Request) -> web.Response:
        return web.Response(status=502, text="upstream connect error")

    client = await serve({"GET /api/v1/nodes": bad_gateway})
    with pytest.raises(ApiError, match="502 Unknown: upstream connect error"):
        await client.get(node_path())


async def test_list_follows_continue_and_restores_item_kind(serve: Any) -> None:
    seen_limits: list[str] = []

    async def pages(request: web.Request) -> web.Response:
        seen_limits.append(request.query.get("limit", ""))
        start = int(request.query.get("continue") or 0)
        items = [{"metadata": {"name": f"n{i}"}} for i in range(start, min(start + 2, 5))]
        meta: dict[str, Any] = {"resourceVersion": "77"}
        if start + 2 < 5:
            meta["continue"] = str(start + 2)
        return web.json_response({"kind": "NodeList", "apiVersion": "v1", "metadata": meta, "items": items})

    client = await serve({"GET /api/v1/nodes": pages})
    result = await client.list(node_path())
    assert [i["metadata"]["name"] for i in result["items"]] == ["n0", "n1", "n2", "n3", "n4"]
    assert result["metadata"] == {"resourceVersion": "77"}
    assert {(i["kind"], i["apiVersion"]) for i in result["items"]} == {("Node", "v1")}
    assert seen_limits == ["500"] * 3


async def test_throttled_requests_are_retried_after_retry_after(serve: Any) -> None:
    calls = 0

    async def throttled(_: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        if calls < 3:
            return web.json_response({"kind": "Status", "code": 429, "reason": "TooManyRequests"},
                                     status=429, headers={"Retry-After": "0"})
        return web.json_response({"kind": "Pod", "metadata": {"name": "p"}}, status=201)

    client = await serve({"POST /api/v1/namespaces/ns/pods": throttled})
    created = await client.create(pod_path("ns"), {"metadata": {"name": "p"}})
    assert created["metadata"]["name"] == "p" and calls == 3


async def test_request_sends_body_content_type_and_auth(serve: Any) -> None:
    got: dict[str, Any] = {}

    async def patch(request: web.Request) -> web.Response:
        got["ct"] = request.content_type
        got["auth"] = request.headers["Authorization"]
        got["ua"] = request.headers["User-Agent"]
        got["body"] = await request.json()
        return web.json_response({"kind": "Pod"})

    client = await serve({"PATCH /api/v1/namespaces/ns/pods/p/status": patch})
    await client.patch(pod_path("ns", "p"), {"status": {"phase": "Running"}}, "strategic", subresource="status")
    assert got == {
        "ct": "application/strategic-merge-patch+json",
        "auth": "Bearer t",
        "ua": "koupleless-module-controller",
        "body": {"status": {"phase": "Running"}},
    }


async def test_delete_sends_options_and_treats_404_as_gone(serve: Any) -> None:
    bodies: list[Any] = []

    async def delete(request: web.Request) -> web.Response:
        bodies.append(await request.json())
        if len(bodies) > 1:
            return web.json_response({"kind": "Status", "code": 404, "reason": "NotFound"}, status=404)
        return web.json_response({"kind": "Pod"})

    client = await serve({"DELETE /api/v1/namespaces/ns/pods/p": delete})
    assert await client.delete(pod_path("ns", "p"), grace_period_seconds=0, preconditions_uid="u-1") == {"kind": "Pod"}
    assert await client.delete(pod_path("ns", "p")) is None
    assert bodies[0] == {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0,
                         "preconditions": {"uid": "u-1"}}


async def test_connection_refused_is_retried_then_reported() -> None:
    config = KubeConfig(server="http://127.0.0.1:1", ssl_context=ssl.create_default_context(), headers={})
    async with KubeClient(config, retries=2) as client:
        with pytest.raises(ApiError) as info:
            await client.get(node_path())
    assert info.value.status == 0 and info.value.reason == "ConnectionError"
    assert "http://127.0.0.1:1/api/v1/nodes" in info.value.message


async def test_unknown_patch_type_is_refused() -> None:
    config = KubeConfig(server="http://127.0.0.1:1", ssl_context=ssl.create_default_context(), headers={})
    async with KubeClient(config) as client:
        with pytest.raises(ValueError, match="use one of merge, strategic, json, apply"):
            await client.patch(pod_path("ns", "p"), {}, "bogus")  # type: ignore[arg-type]


async def test_rotated_token_file_is_picked_up(serve: Any, tmp_path: Path) -> None:
    seen: list[str] = []

    async def nodes(request: web.Request) -> web.Response:
        seen.append(request.headers["Authorization"])
        return web.json_response({"kind": "NodeList", "metadata": {}, "items": []})

    token = tmp_path / "token"
    token.write_text("first")
    local = await serve({"GET /api/v1/nodes": nodes})
    config = KubeConfig(server=local.config.server, ssl_context=local.config.ssl_context,
                        headers={"Authorization": "Bearer first"}, token_file=str(token))
    async with KubeClient(config, qps=None) as client:
        client.token_recheck_seconds = 0.0
        await client.get(node_path())
        token.write_text("second-token")  # projected tokens are replaced in place by the kubelet
        await client.get(node_path())
    assert seen == ["Bearer first", "Bearer second-token"]


async def test_dropped_connection_is_retried_for_merge_patch_but_not_json_patch(serve: Any) -> None:
    calls: dict[str, int] = {"merge": 0, "json": 0}

    async def flaky(request: web.Request) -> web.StreamResponse:
        kind = "json" if request.content_type == "application/json-patch+json" else "merge"
        calls[kind] += 1
        if calls[kind] == 1:
            assert request.transport is not None
            request.transport.close()  # the answer is lost: did the patch apply or not?
            return web.Response()
        return web.json_response({"kind": "Pod"})

    client = await serve({"PATCH /api/v1/namespaces/ns/pods/p": flaky})
    assert await client.patch(pod_path("ns", "p"), {"metadata": {"labels": {"a": "b"}}}) == {"kind": "Pod"}
    assert calls["merge"] == 2
    with pytest.raises(ApiError) as info:
        await client.patch(pod_path("ns", "p"), [{"op": "add", "path": "/x/-", "value": 1}], "json")
    assert info.value.status == 0 and calls["json"] == 1


async def test_503_with_retry_after_is_retried_for_reads(serve: Any) -> None:
    calls = 0

    async def starting(_: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            return web.Response(status=503, text="apiserver starting", headers={"Retry-After": "0"})
        return web.json_response({"kind": "NodeList", "items": []})

    client = await serve({"GET /api/v1/nodes": starting})
    assert (await client.get(node_path()))["kind"] == "NodeList" and calls == 2


async def test_list_starts_over_unpaged_when_the_continue_token_expires(serve: Any) -> None:
    queries: list[dict[str, str]] = []

    async def pages(request: web.Request) -> web.Response:
        queries.append(dict(request.query))
        if "continue" in request.query:
            return web.json_response({"kind": "Status", "code": 410, "reason": "Expired",
                                      "message": "The provided continue parameter is too old"}, status=410)
        if "limit" in request.query:
            return web.json_response({"kind": "PodList", "apiVersion": "v1",
                                      "metadata": {"resourceVersion": "5", "continue": "tok"},
                                      "items": [{"metadata": {"name": "stale"}}]})
        return web.json_response({"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "9"},
                                  "items": [{"metadata": {"name": "a"}}, {"metadata": {"name": "b"}}]})

    client = await serve({"GET /api/v1/pods": pages})
    result = await client.list(pod_path(), {"labelSelector": "app=web"})
    assert [i["metadata"]["name"] for i in result["items"]] == ["a", "b"]
    assert result["metadata"]["resourceVersion"] == "9"
    assert queries[-1] == {"labelSelector": "app=web"}


async def test_unlimited_request_does_not_wait_behind_the_rate_limiter(serve: Any) -> None:
    """A Lease renewal (limited=False) is answered while ordinary writes wait for the limiter."""
    async def ok(_request: web.Request) -> web.Response:
        return web.json_response({"kind": "Lease"})

    client = await serve({"PUT /apis/coordination.k8s.io/v1/namespaces/n/leases/l": ok})
    client._limiter = TokenBucket(qps=0.01, burst=1)  # one request now, the next in 100 s
    path = lease_path("n", "l")
    await client.replace(path, {})
    waiting = asyncio.ensure_future(client.replace(path, {}))
    # (with the limiter, this one would be due in 200 s)
    assert await asyncio.wait_for(client.replace(path, {}, limited=False), 60) == {"kind": "Lease"}
    assert not waiting.done()
    waiting.cancel()


async def test_paced_requests_share_a_bounded_pool_and_renewals_do_not(serve: Any) -> None:
    """A burst of paced writes reuses about qps/8 connections (each new one is a TLS handshake on
    both sides); Lease renewals (limited=False) are never kept waiting for one."""
    state = {"in_flight": 0, "most": 0, "release_at": 0}
    peers: set[Any] = set()
    gate = asyncio.Event()

    async def held(request: web.Request) -> web.Response:
        peers.add(request.transport.get_extra_info("peername") if request.transport else None)
        state["in_flight"] += 1
        state["most"] = max(state["most"], state["in_flight"])
        if state["in_flight"] >= state["release_at"]:
            gate.set()
        await gate.wait()
        state["in_flight"] -= 1
        return web.json_response({"kind": "Lease"})

    plain = await serve({"PUT /apis/coordination.k8s.io/v1/namespaces/n/leases/{name}": held})
    client = KubeClient(plain.config, qps=80, burst=200)
    try:
        assert client.max_paced_connections == 10
        state["release_at"] = 10
        await asyncio.wait_for(asyncio.gather(*(client.replace(lease_path("n", f"l{i}"), {}) for i in range(40))), 30)
        assert state["most"] == 10 and len(peers) <= 10
        # Unpaced: all 40 at once, or the gate (opened by the 40th) never opens.
        gate.clear()
        state.update(most=0, release_at=40)
        await asyncio.wait_for(asyncio.gather(
            *(client.replace(lease_path("n", f"l{i}"), {}, limited=False) for i in range(40))), 30)
        assert state["most"] == 40
    finally:
        await client.close()
