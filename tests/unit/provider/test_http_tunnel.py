"""arklet's HTTP tunnel: heartbeats in over the provider's server, commands out to the base's own
HTTP API (here base-sim's HTTP bases, which answer as arklet does), and the ways a call can fail."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest

from koupleless import arklet
from provider.bases import BaseRegistry
from provider.basesim_http import HttpBaseSimulator
from provider.http_commands import Stamps
from provider.http_tunnel import FORWARDED_HEADER, HttpTunnelServer, HttpTunnelSettings, forward_target
from provider.state import TUNNEL_HTTP, TUNNEL_MQTT, BaseState
from tests.unit.provider.rig import Rig, ready

INSTALL = arklet.CMD_INSTALL_BIZ
JAR = "https://h/biz1-0.0.1-ark-biz.jar"


T = TypeVar("T")


async def wait_until_async(check: Callable[[], T | None], timeout: float, what: str) -> T:
    """Poll `check` on the running loop (other tasks go on) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


def status(base_id: str = "h1", port: int = 1238, ip: str = "127.0.0.1", state: str = "activated") -> dict[str, Any]:
    return {"baseMetadata": {"identity": base_id, "name": "base", "version": "1.1.1", "clusterName": "c"},
            "localIP": ip, "localHostName": "h", "port": port, "state": state}


class HttpRig:
    """A Rig whose provider serves the HTTP tunnel on a free port, with HTTP bases from base-sim."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.provider = rig.provider
        assert self.provider.http_server is not None and self.provider.http_commands is not None
        self.server = self.provider.http_server
        self.sims: list[HttpBaseSimulator] = []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    async def start_bases(self, count: int = 1, **kwargs: Any) -> HttpBaseSimulator:
        sim = HttpBaseSimulator(self.endpoint, count=count, id_prefix=f"h{len(self.sims)}-", heartbeat_interval=60,
                                **kwargs)
        await sim.start()
        self.sims.append(sim)
        for base_id in sim.bases:
            await wait_until_async(lambda b=base_id: self.rig.registry.get(b), 5, what=f"base {base_id} heard")
            self.rig.base(base_id).owned = True
            # Installs wait for a base's first module list; a test that kills a base must not kill it
            # before that list is in (the install would then never be tried).
            await wait_until_async(lambda b=base_id: self.rig.base(b).inventory_known, 5,
                                   what=f"base {base_id}'s module list")
        return sim

    async def calls_done(self) -> None:
        commands = self.provider.http_commands
        assert commands is not None
        await wait_until_async(lambda: not commands._tasks, 5, what="HTTP calls answered")

    async def settle(self) -> None:
        """Pod syncs and HTTP calls until both are quiet."""
        for _ in range(20):
            await self.rig.settle()
            await self.calls_done()
            if not self.rig.queued:
                return
        raise AssertionError("never settled")


@pytest.fixture
async def http() -> AsyncIterator[HttpRig]:
    rig = Rig(http_tunnel=HttpTunnelSettings(port=0))
    hr = HttpRig(rig)
    assert rig.provider.http_commands is not None
    await rig.provider.http_commands.start()
    await hr.server.start()
    try:
        yield hr
    finally:
        for sim in hr.sims:
            await sim.stop()
        await hr.server.stop()
        await rig.provider.http_commands.stop()


async def post(url: str, body: Any = None, *, raw: bytes | None = None, headers: dict[str, str] | None = None
               ) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=raw if raw is not None else None, json=body if raw is None else None,
                                headers=headers) as resp:
            return resp.status, await resp.text()


# --- heartbeats in --------------------------------------------------------------------------------


async def test_an_http_heartbeat_makes_the_same_base_as_an_mqtt_one_reached_at_its_ip_and_port(http: HttpRig) -> None:
    code, text = await post(http.endpoint + "/heartbeat", status(port=4321, ip="10.1.2.3"))
    assert (code, text) == (200, "SUCCESS")
    base = http.rig.base("h1")
    assert (base.tunnel, base.ip, base.tunnel_port, base.ready) == (TUNNEL_HTTP, "10.1.2.3", 4321, True)
    assert base.heartbeat is not None and base.heartbeat.metadata.name == "base"
    assert "virtual-node-h1" in http.rig.node_syncs
    http.rig.heartbeat("m1")  # an MQTT base beside it
    assert http.rig.base("m1").tunnel == TUNNEL_MQTT


async def test_a_heartbeat_without_a_port_is_called_on_arklets_default(http: HttpRig) -> None:
    await post(http.endpoint + "/heartbeat", status(port=0))
    assert http.rig.base("h1").tunnel_port == 1238


async def test_bad_heartbeats_get_400_naming_the_field_and_the_server_keeps_serving(http: HttpRig) -> None:
    code, text = await post(http.endpoint + "/heartbeat", raw=b"{not json")
    assert code == 400 and "not JSON" in text
    code, text = await post(http.endpoint + "/heartbeat", {"baseMetadata": {"name": "x"}, "state": "activated"})
    assert code == 400 and "data.baseMetadata.identity" in text
    code, text = await post(http.endpoint + "/heartbeat", {**status(), "port": "1238"})
    assert code == 400 and "data.port" in text
    code, _ = await post(http.endpoint + "/heartbeat", status())
    assert code == 200


async def test_only_post_is_served(http: HttpRig) -> None:
    async with aiohttp.ClientSession() as session, session.get(http.endpoint + "/heartbeat") as resp:
        assert resp.status == 405


async def test_an_http_base_falls_silent_by_its_own_heartbeat_period_not_mqtts() -> None:
    registry = BaseRegistry("dev", _Listener(), heartbeat_interval=1, missed_heartbeats=3, gone_after=600)
    registry.http_heartbeat_interval = 12
    registry.connection_changed(True)
    registry.http_hearing_since = 0.0
    registry.receive(arklet.HEART, status(), Stamps().next("h1"))
    base = registry.get("h1")
    assert base is not None
    heard = base.last_heard
    registry.judge(now=heard + 10)  # silent 10 s: three missed MQTT heartbeats, under one HTTP one
    assert base.ready
    registry.judge(now=heard + 37)
    assert not base.ready and base.not_ready_reason == "BaseHeartbeatMissed"


async def test_a_broker_outage_says_nothing_about_http_bases() -> None:
    registry = BaseRegistry("dev", _Listener(), heartbeat_interval=1, missed_heartbeats=3, gone_after=600)
    registry.http_heartbeat_interval = 1
    registry.http_hearing_since = 0.0
    registry.connection_changed(False)
    registry.receive(arklet.HEART, status(), Stamps().next("h1"))
    base = registry.get("h1")
    assert base is not None
    registry.judge(now=base.last_heard + 5)
    assert not base.ready


# --- authentication -------------------------------------------------------------------------------


async def test_a_token_is_needed_as_a_bearer_header_or_in_the_endpoint_path(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# comment\ns3cret\n")
    registry = BaseRegistry("dev", _Listener(), heartbeat_interval=1, missed_heartbeats=3, gone_after=600)
    server = HttpTunnelServer(HttpTunnelSettings(port=0, token_file=str(tokens)), registry, Stamps(), identity="me",
                              baseline=lambda _b: [])
    await server.start()
    try:
        url = f"http://127.0.0.1:{server.port}"
        code, text = await post(url + "/heartbeat", status())
        assert code == 401 and "--http-tunnel-token-file" in text and registry.get("h1") is None
        code, _ = await post(url + "/heartbeat", status(), headers={"Authorization": "Bearer wrong"})
        assert code == 401
        code, _ = await post(url + "/heartbeat", status("a"), headers={"Authorization": "Bearer s3cret"})
        assert code == 200 and registry.get("a") is not None
        code, _ = await post(url + "/t/s3cret/heartbeat", status("b"))
        assert code == 200 and registry.get("b") is not None
        code, _ = await post(url + "/t/wrong/heartbeat", status("c"))
        assert code == 401 and registry.get("c") is None
        tokens.write_text("rotated\n")
        code, _ = await post(url + "/t/rotated/heartbeat", status("d"))
        assert code == 200 and registry.get("d") is not None
    finally:
        await server.stop()


# --- queryBaseline --------------------------------------------------------------------------------


async def test_query_baseline_answers_the_modules_of_the_pods_bound_to_the_bases_node(http: HttpRig) -> None:
    code, text = await post(http.endpoint + "/queryBaseline", {"identity": "h1", "name": "base", "version": "1"})
    assert (code, text) == (200, "[]")  # a base nobody knows has nothing to install
    await post(http.endpoint + "/heartbeat", status())
    http.rig.add_pod("p", image=JAR, node="virtual-node-h1")
    http.rig.add_pod("elsewhere", image=JAR, node="virtual-node-other")
    async with aiohttp.ClientSession() as session:
        async with session.post(http.endpoint + "/queryBaseline", json={"identity": "h1"}) as resp:
            assert await resp.json() == [{"bizName": "biz1", "bizVersion": "0.0.1", "bizUrl": JAR}]
    code, text = await post(http.endpoint + "/queryBaseline", {"name": "no identity"})
    assert code == 400 and "body.identity" in text


# --- commands out ---------------------------------------------------------------------------------


async def test_an_http_base_gets_its_module_over_http_and_the_pod_becomes_ready(http: HttpRig) -> None:
    sim = await http.start_bases()
    http.rig.online("m1")  # an MQTT base beside it: its commands stay on MQTT
    await http.settle()
    http.rig.add_pod("p", image=JAR, node="virtual-node-h0-0")
    await http.settle()
    assert ready(http.rig.pod("p"))
    assert [(m.name, m.version, m.state) for m in sim.bases["h0-0"].modules.values()] == [
        ("biz1", "0.0.1", "ACTIVATED")]
    assert http.rig.events.reasons("p") == ["Installing", "Installed"]
    assert all(base_id == "m1" for base_id, _c, _b in http.rig.tunnel.sent), "nothing for h0-0 over MQTT"
    http.rig.delete_pod("p")
    await http.settle()
    assert sim.bases["h0-0"].modules == {} and "ns/p" in http.rig.kube.deleted


async def test_repeat_biz_over_http_is_adopted_like_over_mqtt(http: HttpRig) -> None:
    sim = await http.start_bases()
    sim._perform_install(sim.bases["h0-0"], arklet.BizModel("biz1", "0.0.1", JAR))  # already there
    http.rig.add_pod("p", image=JAR, node="virtual-node-h0-0")
    await http.settle()
    assert ready(http.rig.pod("p"))
    assert sim.bases["h0-0"].installs == 1


async def test_a_failed_install_over_http_shows_the_bases_message_and_backs_off(http: HttpRig) -> None:
    await http.start_bases(fail_biz=frozenset({"biz1"}))
    http.rig.add_pod("p", image=JAR, node="virtual-node-h0-0")
    await http.settle()
    assert not ready(http.rig.pod("p"))
    [message] = [m for n, _t, r, m in http.rig.events.sent if r == "InstallFailed"]
    assert "simulated failure" in message and "trying again in 10s" in message


async def test_a_base_that_does_not_answer_is_an_install_failure_retried_with_backoff(http: HttpRig) -> None:
    sim = await http.start_bases()
    sim.kill("h0-0")  # its port drops every connection, as a dead JVM's would
    http.rig.add_pod("p", image=JAR, node="virtual-node-h0-0")
    await http.settle()
    rec = http.rig.reconciler.records["ns/p"]
    assert rec.pending == {} and "biz1" in rec.failed, (rec, http.rig.events.sent)
    assert rec.failed["biz1"].backoff == 10
    [message] = [m for n, _t, r, m in http.rig.events.sent if r == "InstallFailed"]
    assert f"127.0.0.1:{sim.ports['h0-0']}/installBiz" in message


class _FakeBase:
    """An HTTP server that answers every call with one fixed reply."""

    def __init__(self, status: int, body: bytes) -> None:
        self.status, self.body = status, body

    async def __aenter__(self) -> int:
        from aiohttp import web

        async def answer(_r: web.Request) -> web.Response:
            return web.Response(status=self.status, body=self.body, content_type="application/json")

        app = web.Application()
        app.router.add_post("/{command}", answer)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return int(self.runner.addresses[0][1])

    async def __aexit__(self, *_: Any) -> None:
        await self.runner.cleanup()


@pytest.mark.parametrize(("code", "body", "said"), [
    (500, b"boom", "answered HTTP 500: boom"),
    (200, b"<html>", "not arklet's reply"),
    (200, b'{"code": "SUCCESS", "data": {}, "baseIdentity": "someone-else"}', "'someone-else' answered"),
])
async def test_answers_that_are_not_arklets_are_failures_naming_what_came_back(
        http: HttpRig, code: int, body: bytes, said: str) -> None:
    async with _FakeBase(code, body) as port:
        await post(http.endpoint + "/heartbeat", status("f1", port=port))
        http.rig.base("f1").owned = True
        http.rig.registry.receive(arklet.BIZ, {"code": "SUCCESS", "data": []}, Stamps().next("x"), base_id="f1")
        http.rig.add_pod("p", image=JAR, node="virtual-node-f1")
        await http.settle()
    [message] = [m for n, _t, r, m in http.rig.events.sent if r == "InstallFailed"]
    assert said in message


async def test_a_hung_base_holds_up_only_its_own_calls(http: HttpRig) -> None:
    from aiohttp import web

    release = asyncio.Event()

    async def hang(_r: web.Request) -> web.Response:
        await release.wait()
        return web.Response(status=500)

    app = web.Application()
    app.router.add_post("/{command}", hang)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        await post(http.endpoint + "/heartbeat", status("hung", port=int(runner.addresses[0][1])))
        http.rig.base("hung").owned = True
        sim = await http.start_bases()
        http.rig.registry.receive(arklet.BIZ, {"code": "SUCCESS", "data": []}, Stamps().next("x"), base_id="hung")
        http.rig.add_pod("stuck", image=JAR, node="virtual-node-hung")
        http.rig.add_pod("fine", image=JAR, node="virtual-node-h0-0")
        await http.rig.settle()

        def fine_installed() -> bool:
            return bool(sim.bases["h0-0"].modules)

        await wait_until_async(fine_installed, 5, what="the other base's install")
    finally:
        release.set()
        await runner.cleanup()


# --- several replicas -----------------------------------------------------------------------------


def test_a_heartbeat_is_forwarded_only_to_another_replica_holding_the_lease() -> None:
    base = BaseState("b", "virtual-node-b", lease_holder_address="10.0.0.2:7777")
    assert forward_target(base, "10.0.0.1:7777", forwarded=False) == "10.0.0.2:7777"
    assert forward_target(base, "10.0.0.1:7777", forwarded=True) is None, "never forwarded twice"
    assert forward_target(base, "10.0.0.2:7777", forwarded=False) is None, "not to itself"
    assert forward_target(None, "10.0.0.1:7777", forwarded=False) is None
    base.owned = True
    assert forward_target(base, "10.0.0.1:7777", forwarded=False) is None, "the holder keeps it"
    assert forward_target(BaseState("c", "virtual-node-c"), "x", forwarded=False) is None, "holder unknown"


async def test_a_heartbeat_reaching_a_replica_without_the_lease_ends_at_the_holder(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("t0k\n")
    registries = [BaseRegistry("dev", _Listener(), heartbeat_interval=1, missed_heartbeats=3, gone_after=600)
                  for _ in range(2)]
    servers = [HttpTunnelServer(HttpTunnelSettings(port=0, token_file=str(tokens)), r, Stamps(), identity=f"r{i}",
                                baseline=lambda _b: []) for i, r in enumerate(registries)]
    for s in servers:
        await s.start()
    standby, holder = servers
    try:
        holder_address = f"127.0.0.1:{holder.port}"
        await post(f"http://127.0.0.1:{standby.port}/t/t0k/heartbeat", status("b", ip=""))  # first: no holder known
        seen = registries[0].get("b")
        assert seen is not None and registries[1].get("b") is None
        seen.lease_holder_address = holder_address  # what the standby reads on the Lease
        code, _ = await post(f"http://127.0.0.1:{standby.port}/t/t0k/heartbeat", status("b", ip=""))
        assert code == 200
        held = await wait_until_async(lambda: registries[1].get("b"), 5, what="the heartbeat at the holder")
        assert held.ready and held.tunnel == TUNNEL_HTTP
        assert held.ip == "127.0.0.1", "the base's own address, not the forwarding replica's"
        # A forwarded heartbeat is never sent on, even by a replica that thinks someone else holds it.
        held.lease_holder_address = f"127.0.0.1:{standby.port}"
        sent_on: list[Any] = []
        holder._forward = lambda *a: sent_on.append(a)  # type: ignore[method-assign]
        code, _ = await post(f"http://127.0.0.1:{holder.port}/heartbeat", status("b"),
                             headers={FORWARDED_HEADER: "r0", "Authorization": "Bearer t0k"})
        assert code == 200 and sent_on == []
        code, _ = await post(f"http://127.0.0.1:{holder.port}/heartbeat", status("b"),
                             headers={"Authorization": "Bearer t0k"})
        assert code == 200 and len(sent_on) == 1, "the same heartbeat straight from the base is"
    finally:
        for s in servers:
            await s.stop()


class _Listener:
    def __getattr__(self, _name: str) -> Any:
        return lambda *_a, **_k: None


# --- the manifests ---------------------------------------------------------------------------------


def test_the_manifests_serve_the_http_tunnel_on_arklets_port_through_a_service() -> None:
    import yaml

    from koupleless.cli import build_parser
    from provider.cli import http_tunnel_settings

    d = Path(__file__).resolve().parents[3] / "manifests" / "provider"
    deployment = yaml.safe_load((d / "deployment.yaml").read_text())
    service = yaml.safe_load((d / "http-tunnel-service.yaml").read_text())
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = build_parser(container["args"]).parse_args(container["args"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    [svc_port] = service["spec"]["ports"]
    assert args.http_tunnel_port == ports[svc_port["targetPort"]] == svc_port["port"] == 7777
    assert args.http_tunnel_bind_address == "0.0.0.0"
    assert service["spec"]["selector"] == deployment["spec"]["template"]["metadata"]["labels"]
    assert "http-tunnel-service.yaml" in yaml.safe_load((d / "kustomization.yaml").read_text())["resources"]
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POD_IP", "10.9.8.7")
        settings = http_tunnel_settings(args)
    assert settings is not None and settings.advertise == "10.9.8.7:7777", "where the other replicas forward to"


def test_bad_http_tunnel_flags_are_refused_naming_the_flag(tmp_path: Path) -> None:
    from koupleless.cli import build_parser
    from provider.cli import http_tunnel_settings

    def settings(*flags: str) -> Any:
        argv = ["provider", "--mqtt-broker", "127.0.0.1:1883", *flags]
        return http_tunnel_settings(build_parser(argv).parse_args(argv))

    assert settings() is None, "off unless asked for"
    empty = tmp_path / "tokens"
    empty.write_text("\n")
    for flags, said in ((("--http-tunnel-port", "70000"), "--http-tunnel-port 70000"),
                        (("--http-tunnel-port", "7777", "--http-tunnel-tls-cert", "x"), "go together"),
                        (("--http-tunnel-port", "7777", "--http-tunnel-client-ca", "x"), "needs TLS"),
                        (("--http-tunnel-port", "7777", "--http-tunnel-token-file", str(tmp_path / "nope")),
                         "no such file"),
                        (("--http-tunnel-port", "7777", "--http-tunnel-token-file", str(empty)), "no token in it")):
        with pytest.raises(ValueError, match=said):
            settings(*flags)
