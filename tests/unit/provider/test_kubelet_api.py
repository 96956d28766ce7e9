"""The kubelet API the provider serves for its virtual Nodes: `kubectl logs` gets a module's history
and state, `kubectl exec` one sentence naming the base, and only kube-apiserver (a client certificate
from the client CA, authorized by a SubjectAccessReview) gets either."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import REGISTRY

from certs import pki
from koupleless import arklet
from koupleless.kube.client import ApiError
from provider import kubelet_api
from provider.kubelet_api import Identity, KubeletServer, KubeletSettings, Sources, SubjectAccessReviewer
from provider.state import BaseState, BizRecord

URL = "https://h/biz1-0.0.1-ark-biz.jar"
NOW = dt.datetime(2026, 1, 1, 0, 1, tzinfo=dt.UTC)
APISERVER = Identity("kube-apiserver-kubelet-client", ("system:masters", "system:authenticated"))
SENTENCE = ("module biz1 of Pod ns/p runs inside the JVM of base b1 (Node virtual-node-b1, 10.0.0.9): there is no "
            "container to exec into or attach to; use the base's own tools (arthas, its logs) instead")


def pod() -> dict[str, Any]:
    return {
        "metadata": {"name": "p", "namespace": "ns", "uid": "u1"},
        "spec": {"nodeName": "virtual-node-b1",
                 "containers": [{"name": "biz1", "image": URL}, {"name": "biz2", "image": "https://h/biz2.jar"}]},
        "status": {
            "phase": "Running", "hostIP": "10.0.0.9",
            "containerStatuses": [
                {"name": "biz1", "ready": True, "state": {"running": {"startedAt": "2026-01-01T00:00:05Z"}}},
                {"name": "biz2", "ready": False, "state": {"waiting": {
                    "reason": "InstallFailed", "message": "disk full on base b1 (2 tries; trying again 20s after the last)"}}},
            ],
        },
    }


def event(name: str, reason: str, message: str, first: str, *, count: int = 1, last: str | None = None,
          component: str = "koupleless-provider", uid: str = "u1") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "ns"}, "involvedObject": {"kind": "Pod", "uid": uid},
            "reason": reason, "message": message, "source": {"component": component},
            "firstTimestamp": first, "lastTimestamp": last or first, "count": count}


EVENTS = [
    event("p.2", "Installed", "Installed module biz1:0.0.1 on base b1", "2026-01-01T00:00:02Z"),
    event("p.1", "Installing", f"Installing module biz1:0.0.1 from {URL} on base b1", "2026-01-01T00:00:01Z"),
    event("p.3", "Installing", "Installing module biz2:0.0.1 from https://h/biz2.jar on base b1", "2026-01-01T00:00:01Z"),
    event("p.4", "InstallFailed", "disk full on base b1 installing biz2:0.0.1; trying again in 20s",
          "2026-01-01T00:00:02Z", count=2, last="2026-01-01T00:00:30Z"),
    event("p.5", "Scheduled", "Successfully assigned ns/p to virtual-node-b1", "2026-01-01T00:00:00Z",
          component="default-scheduler"),
    event("p.6", "NodeNotReady", "base b1 stopped heartbeating", "2026-01-01T00:00:40Z"),
]


class FakeKube:
    def __init__(self) -> None:
        self.pods: dict[str, dict[str, Any]] = {"/api/v1/namespaces/ns/pods/p": pod()}
        self.events = list(EVENTS)
        self.events_error: ApiError | None = None
        self.reviews: list[dict[str, Any]] = []
        self.allow = True
        self.review_error: ApiError | None = None

    async def get(self, path: str, params: Any = None) -> dict[str, Any]:
        if path not in self.pods:
            raise ApiError(404, "NotFound", path)
        return self.pods[path]

    async def list(self, path: str, params: Any = None) -> dict[str, Any]:
        if self.events_error:
            raise self.events_error
        assert path == "/api/v1/namespaces/ns/events"
        assert params == {"fieldSelector": "involvedObject.uid=u1"}
        return {"items": [e for e in self.events if e["involvedObject"]["uid"] == "u1"]}

    async def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        assert path == "/apis/authorization.k8s.io/v1/subjectaccessreviews"
        if self.review_error:
            raise self.review_error
        self.reviews.append(body)
        return {**body, "status": {"allowed": self.allow}}


def base() -> BaseState:
    b = BaseState(base_id="b1", node_name="virtual-node-b1")
    b.heartbeat = arklet.Heartbeat(arklet.BaseMetadata("b1", "base", "1.1.1"), "10.0.0.9", "h", 0, arklet.ACTIVATED)
    b.inventory_known = True
    b.bizs["biz1:0.0.1"] = BizRecord("biz1", "0.0.1", arklet.ACTIVATED, 1767225602000, ts=1767225602000)
    return b


def sources(kube: FakeKube, **kw: Any) -> Sources:
    b = base()
    return Sources(kube, base_for_node=lambda name: b if name == b.node_name else None, now=lambda: NOW, **kw)


@pytest.fixture
def kube() -> FakeKube:
    return FakeKube()


@pytest.fixture
async def client(kube: FakeKube) -> AsyncIterator[TestClient]:
    app = kubelet_api.create_app(sources(kube), authorizer=SubjectAccessReviewer(kube),
                                 authenticate=lambda _req: APISERVER)
    async with TestClient(TestServer(app)) as c:
        yield c


async def logs(client: TestClient, container: str = "biz1", query: str = "") -> str:
    resp = await client.get(f"/containerLogs/ns/p/{container}{query}")
    assert resp.status == 200, await resp.text()
    assert resp.content_type == "text/plain"
    return await resp.text()


# --- kubectl logs -----------------------------------------------------------------------------------


async def test_logs_tell_the_modules_history_what_the_base_reports_and_its_state(client: TestClient) -> None:
    assert (await logs(client)).splitlines() == [
        f"2026-01-01T00:00:01Z Installing: Installing module biz1:0.0.1 from {URL} on base b1",
        "2026-01-01T00:00:02Z Installed: Installed module biz1:0.0.1 on base b1",
        "2026-01-01T00:00:40Z NodeNotReady: base b1 stopped heartbeating",  # about the whole Pod
        "2026-01-01T00:01:00Z base b1 reports biz1:0.0.1 ACTIVATED since 2026-01-01T00:00:02Z",
        "2026-01-01T00:01:00Z status: running since 2026-01-01T00:00:05Z (Ready)",
    ]


async def test_each_container_gets_its_own_module_only(client: TestClient) -> None:
    assert (await logs(client, "biz2")).splitlines() == [
        "2026-01-01T00:00:01Z Installing: Installing module biz2:0.0.1 from https://h/biz2.jar on base b1",
        "2026-01-01T00:00:02Z InstallFailed: disk full on base b1 installing biz2:0.0.1; trying again in 20s "
        "(x2, last at 2026-01-01T00:00:30Z)",
        "2026-01-01T00:00:40Z NodeNotReady: base b1 stopped heartbeating",
        "2026-01-01T00:01:00Z base b1: holds no module biz2",
        "2026-01-01T00:01:00Z status: waiting: InstallFailed: disk full on base b1 (2 tries; trying again 20s "
        "after the last)",
    ]


async def test_kubelets_query_parameters(client: TestClient) -> None:
    full = (await logs(client)).splitlines()
    assert (await logs(client, query="?tailLines=2")).splitlines() == full[-2:]
    assert (await logs(client, query="?tailLines=0")) == ""
    assert (await logs(client, query="?sinceSeconds=30")).splitlines() == full[2:]
    assert (await logs(client, query="?sinceTime=2026-01-01T00:00:02Z")).splitlines() == full[1:]
    assert (await logs(client, query="?limitBytes=10")) == full[0][:10]
    stamped = (await logs(client, query="?timestamps=true")).splitlines()
    assert stamped[0] == f"2026-01-01T00:00:01.000000000Z Installing: Installing module biz1:0.0.1 from {URL} on base b1"
    # follow: what exists, then the stream ends; unknown or malformed values are ignored.
    assert (await logs(client, query="?follow=true&previous=true&stream=All&tailLines=x&sinceSeconds=-1")
            ).splitlines() == full


async def test_unknown_pod_or_container_is_404_as_kubelet_says_it(client: TestClient, kube: FakeKube) -> None:
    resp = await client.get("/containerLogs/ns/nope/biz1")
    assert (resp.status, await resp.text()) == (404, 'pod "nope" does not exist')
    resp = await client.get("/containerLogs/ns/p/biz9")
    assert (resp.status, await resp.text()) == (404, 'container "biz9" not found in pod "p"')
    # A Pod on a real Node is no business of the virtual Nodes' kubelet.
    kube.pods["/api/v1/namespaces/ns/pods/p"]["spec"]["nodeName"] = "worker-1"
    resp = await client.get("/containerLogs/ns/p/biz1")
    assert (resp.status, await resp.text()) == (404, 'pod "p" does not exist')


async def test_the_pod_cache_answers_first(kube: FakeKube) -> None:
    cached = pod()
    cached["metadata"]["name"] = "only-cached"
    app = kubelet_api.create_app(sources(kube, cached_pod=lambda key: cached if key == "ns/only-cached" else None),
                                 authenticate=lambda _req: APISERVER)
    async with TestClient(TestServer(app)) as c:
        assert (await c.get("/containerLogs/ns/only-cached/biz1")).status == 200
        assert (await c.get("/containerLogs/ns/p/biz1")).status == 200  # a miss asks the API server


async def test_events_that_cannot_be_read_leave_the_rest(client: TestClient, kube: FakeKube) -> None:
    kube.events_error = ApiError(403, "Forbidden", 'events is forbidden: cannot list resource "events"')
    lines = (await logs(client)).splitlines()
    assert lines[0].startswith("2026-01-01T00:01:00Z events: cannot be read from the API server (")
    assert lines[-1] == "2026-01-01T00:01:00Z status: running since 2026-01-01T00:00:05Z (Ready)"


async def test_a_failed_pod_and_a_base_not_heard(kube: FakeKube) -> None:
    p = kube.pods["/api/v1/namespaces/ns/pods/p"]
    p["spec"]["nodeName"] = "virtual-node-b2"
    p["status"] = {"phase": "Failed", "reason": "ModuleConflict", "message": "Pod rejected: base b2 already runs biz1"}
    kube.events = []
    app = kubelet_api.create_app(sources(kube), authenticate=lambda _req: APISERVER)
    async with TestClient(TestServer(app)) as c:
        assert (await logs(c)).splitlines() == [
            "2026-01-01T00:01:00Z base b2: not heard from by this provider",
            "2026-01-01T00:01:00Z status: Pod Failed: ModuleConflict: Pod rejected: base b2 already runs biz1",
        ]


# --- kubectl exec / attach / port-forward -----------------------------------------------------------


async def test_exec_and_attach_get_one_sentence_naming_the_module_pod_and_base(client: TestClient) -> None:
    for path in ("/exec/ns/p/biz1?command=ls&stdout=1", "/exec/ns/p/u1/biz1?command=ls", "/attach/ns/p/biz1",
                 "/run/ns/p/biz1"):
        for method in ("POST", "GET"):
            resp = await client.request(method, path)
            assert (resp.status, await resp.text()) == (400, SENTENCE), (method, path)
    resp = await client.post("/portForward/ns/p")
    assert await resp.text() == (
        "modules biz1, biz2 of Pod ns/p run inside the JVM of base b1 (Node virtual-node-b1, 10.0.0.9): there is no "
        "container to forward ports from; the module serves on the base's own ports, reach them at the base's address")
    resp = await client.post("/exec/ns/p/biz9?command=ls")
    assert (resp.status, await resp.text()) == (404, 'container "biz9" not found in pod "p"')
    resp = await client.post("/exec/ns/nope/biz1?command=ls")
    assert (resp.status, await resp.text()) == (404, 'pod "nope" does not exist')


async def test_an_upgrade_request_is_answered_not_upgraded(client: TestClient) -> None:
    """What kube-apiserver sends for `kubectl exec`: a SPDY upgrade. The answer is a plain HTTP
    error whose body kube-apiserver's SPDY client hands to kubectl verbatim."""
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(b"POST /exec/ns/p/biz1?command=ls&output=1&error=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Connection: Upgrade\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: v5.channel.k8s.io\r\n"
                 b"Content-Length: 0\r\n\r\n")
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)  # the server closes the connection after answering
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert body.decode() == SENTENCE


# --- the rest, and who may ask -----------------------------------------------------------------------


async def test_healthz_and_nothing_else(client: TestClient) -> None:
    def counted(endpoint: str) -> float:
        return REGISTRY.get_sample_value("koupleless_provider_kubelet_api_requests_total",
                                         {"endpoint": endpoint, "code": "404"}) or 0.0

    before = counted("other"), counted("exec")
    assert (await (await client.get("/healthz")).text()) == "ok"
    for path in ("/pods", "/stats/summary", "/metrics", "/containerLogs/ns/p", "/exec/ns"):
        assert (await client.get(path)).status == 404, path
    assert (counted("other"), counted("exec")) == (before[0] + 3, before[1] + 1)


async def test_a_client_without_a_certificate_gets_401_except_on_healthz(kube: FakeKube) -> None:
    app = kubelet_api.create_app(sources(kube), authorizer=SubjectAccessReviewer(kube), authenticate=lambda _req: None)
    async with TestClient(TestServer(app)) as c:
        assert (await c.get("/healthz")).status == 200
        for path in ("/containerLogs/ns/p/biz1", "/exec/ns/p/biz1"):
            resp = await c.post(path) if "exec" in path else await c.get(path)
            assert (resp.status, await resp.text()) == (401, "Unauthorized")
    assert kube.reviews == []


async def test_subject_access_review_as_kubelets_webhook_mode(client: TestClient, kube: FakeKube) -> None:
    await logs(client)
    await client.post("/exec/ns/p/biz1")
    assert [r["spec"] for r in kube.reviews] == [
        {"user": APISERVER.user, "groups": list(APISERVER.groups),
         "resourceAttributes": {"verb": verb, "version": "v1", "resource": "nodes", "subresource": "proxy",
                                "name": "virtual-node-b1"}}
        for verb in ("get", "create")
    ]
    await logs(client, query="?tailLines=1")
    assert len(kube.reviews) == 2  # allowed answers are cached


async def test_denied_and_failed_reviews(kube: FakeKube) -> None:
    kube.allow = False
    app = kubelet_api.create_app(sources(kube), authorizer=SubjectAccessReviewer(kube),
                                 authenticate=lambda _req: Identity("system:node:worker-1", ("system:nodes",)))
    async with TestClient(TestServer(app)) as c:
        resp = await c.get("/containerLogs/ns/p/biz1")
        assert (resp.status, await resp.text()) == (
            403, "Forbidden (user=system:node:worker-1, verb=get, resource=nodes, subresource(s)=[proxy])\n")
        # Denied before "no such Pod": a client that may not ask learns nothing about Pods.
        resp = await c.get("/containerLogs/ns/nope/biz1")
        assert resp.status == 403
        kube.review_error = ApiError(0, "ConnectionError", "apiserver away")
        resp = await c.post("/exec/ns/p/biz1")
        assert (resp.status, await resp.text()) == (
            500, "Authorization error (user=system:node:worker-1, verb=create, resource=nodes, subresource=proxy)")


async def test_review_cache_expires() -> None:
    kube = FakeKube()
    clock = [0.0]
    reviewer = SubjectAccessReviewer(kube, clock=lambda: clock[0])
    assert await reviewer.allowed(APISERVER, "get", "n")
    kube.allow = False
    assert await reviewer.allowed(APISERVER, "get", "n")  # cached
    clock[0] = kubelet_api.ALLOWED_TTL_S + 1
    assert not await reviewer.allowed(APISERVER, "get", "n")
    kube.allow = True
    clock[0] += kubelet_api.DENIED_TTL_S - 1
    assert not await reviewer.allowed(APISERVER, "get", "n")
    clock[0] += 2
    assert await reviewer.allowed(APISERVER, "get", "n")


# --- over TLS, as kube-apiserver connects ---------------------------------------------------------


@pytest.fixture
def pki_dir(tmp_path: Path) -> Path:
    ca = pki.new_ca("test-cluster-ca", days=1)
    ca.write(tmp_path / "ca.crt", tmp_path / "ca.key")
    pki.issue(ca, "kubelet", ips=["127.0.0.1"], days=1).write(tmp_path / "tls.crt", tmp_path / "tls.key")
    pki.issue(ca, "kube-apiserver-kubelet-client", organizations=["system:masters"], days=1, server=False,
              client=True).write(tmp_path / "client.crt", tmp_path / "client.key")
    other = pki.new_ca("someone-else", days=1)
    pki.issue(other, "intruder", days=1, server=False, client=True).write(tmp_path / "other.crt", tmp_path / "other.key")
    return tmp_path


def client_ssl(ca: Path | None, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca)) if ca else ssl._create_unverified_context()
    if cert and key:
        ctx.load_cert_chain(cert, key)
    return ctx


async def get(url: str, ctx: ssl.SSLContext) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.get(url, ssl=ctx) as resp:
        return resp.status, await resp.text()


async def test_over_tls_only_the_client_cas_certificates_get_in(pki_dir: Path) -> None:
    kube = FakeKube()
    settings = KubeletSettings(port=0, address="127.0.0.1", client_ca=str(pki_dir / "ca.crt"), bind="127.0.0.1",
                               cert_file=str(pki_dir / "tls.crt"), key_file=str(pki_dir / "tls.key"))
    server = KubeletServer(settings, sources(kube))
    await server.start()
    try:
        url = f"https://127.0.0.1:{server.port}"
        ca = pki_dir / "ca.crt"
        status, text = await get(f"{url}/containerLogs/ns/p/biz1?tailLines=1",
                                 client_ssl(ca, pki_dir / "client.crt", pki_dir / "client.key"))
        assert (status, text) == (200, "2026-01-01T00:01:00Z status: running since 2026-01-01T00:00:05Z (Ready)\n")
        assert kube.reviews[0]["spec"]["user"] == "kube-apiserver-kubelet-client"
        assert kube.reviews[0]["spec"]["groups"] == ["system:masters", "system:authenticated"]
        assert await get(f"{url}/containerLogs/ns/p/biz1", client_ssl(ca)) == (401, "Unauthorized")
        assert await get(f"{url}/healthz", client_ssl(ca)) == (200, "ok")
        with pytest.raises(aiohttp.ClientError):
            await get(f"{url}/containerLogs/ns/p/biz1", client_ssl(ca, pki_dir / "other.crt", pki_dir / "other.key"))
    finally:
        await server.stop()


async def test_without_a_serving_certificate_one_is_made_for_the_address(pki_dir: Path) -> None:
    settings = KubeletSettings(port=0, address="module-controller-provider.module-controller.svc",
                               client_ca=str(pki_dir / "ca.crt"), bind="127.0.0.1", authorization="alwaysallow")
    server = KubeletServer(settings, sources(FakeKube()))
    await server.start()
    try:
        ctx = client_ssl(None, pki_dir / "client.crt", pki_dir / "client.key")
        status, text = await get(f"https://127.0.0.1:{server.port}/exec/ns/p/biz1", ctx)
        assert (status, text) == (400, SENTENCE)
        _reader, writer = await asyncio.open_connection("127.0.0.1", server.port, ssl=ctx)
        cert = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
        from cryptography import x509

        names = x509.load_der_x509_certificate(cert).extensions.get_extension_for_class(x509.SubjectAlternativeName)
        assert "module-controller-provider.module-controller.svc" in names.value.get_values_for_type(x509.DNSName)
    finally:
        await server.stop()


async def test_a_taken_port_is_an_error_at_start(pki_dir: Path) -> None:
    blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = blocker.sockets[0].getsockname()[1]
    try:
        server = KubeletServer(KubeletSettings(port=port, address="127.0.0.1", client_ca=str(pki_dir / "ca.crt"),
                                               bind="127.0.0.1"), sources(FakeKube()))
        with pytest.raises(OSError):
            await server.start()
    finally:
        blocker.close()
        await blocker.wait_closed()


# --- the manifests ---------------------------------------------------------------------------------


def test_the_provider_manifests_serve_the_kubelet_api_at_the_address_nodes_advertise() -> None:
    import yaml

    from koupleless.cli import build_parser

    d = Path(__file__).resolve().parents[3] / "manifests" / "provider"
    deployment = yaml.safe_load((d / "deployment.yaml").read_text())
    service = yaml.safe_load((d / "service.yaml").read_text())
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = build_parser(container["args"]).parse_args(container["args"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    [svc_port] = service["spec"]["ports"]
    assert args.kubelet_port == ports[svc_port["targetPort"]] == svc_port["port"]
    meta = service["metadata"]
    assert args.kubelet_address == f"{meta['name']}.{meta['namespace']}.svc"
    assert service["spec"]["selector"] == deployment["spec"]["template"]["metadata"]["labels"]
    assert "service.yaml" in yaml.safe_load((d / "kustomization.yaml").read_text())["resources"]
    rules = yaml.safe_load_all((d / "rbac.yaml").read_text())
    granted = {(g, r, v) for doc in rules if doc["kind"] == "ClusterRole" for rule in doc["rules"]
               for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    assert {("", "events", "list"), ("", "pods", "get"),
            ("authorization.k8s.io", "subjectaccessreviews", "create")} <= granted


def test_flags_decide_what_the_nodes_advertise(tmp_path: Path) -> None:
    from koupleless.cli import build_parser
    from provider.cli import kubelet_settings, options_from_args

    def parse(*extra: str) -> Any:
        argv = ["provider", "--mqtt-broker", "127.0.0.1:1883", *extra]
        return build_parser(argv).parse_args(argv)

    ca = tmp_path / "ca.crt"
    ca.write_text("")
    args = parse("--kubelet-client-ca", str(ca), "--kubelet-address", "10.96.0.20", "--kubelet-port", "10255")
    assert kubelet_settings(args) == KubeletSettings(port=10255, address="10.96.0.20", client_ca=str(ca))
    node = options_from_args(args).node
    assert (node.kubelet_address, node.kubelet_port) == ("10.96.0.20", 10255)
    # Off: asked to be, or no CA to tell kube-apiserver from anyone else (outside a cluster).
    for off in (parse("--kubelet-client-ca", str(ca), "--kubelet-port", "0"), parse()):
        if off.kubelet_client_ca is None and Path(kubelet_api.IN_CLUSTER_CA).exists():
            continue
        assert kubelet_settings(off) is None
        assert (options_from_args(off).node.kubelet_address, options_from_args(off).node.kubelet_port) == ("", 0)
