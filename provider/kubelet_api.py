"""The kubelet API of the virtual Nodes, served by the provider: what kube-apiserver calls for
`kubectl logs`, `kubectl exec`, `attach` and `port-forward` on a module Pod.

kube-apiserver dials a Pod's Node at its preferred address (`--kubelet-preferred-address-types`)
and `status.daemonEndpoints.kubeletEndpoint.Port`; `vnode.node_status` puts this server's address
and port there for every virtual Node. It connects over TLS with its `--kubelet-client-certificate`,
and this server treats it as kubelet does:

- authentication (kubelet's x509): a client certificate signed by `--kubelet-client-ca`. A
  certificate from another CA fails the TLS handshake; no certificate at all is 401 Unauthorized.
  The user is the certificate's CN, its groups the O values (and system:authenticated).
- authorization (kubelet's `--authorization-mode=Webhook`): a SubjectAccessReview asking whether
  that user may `<verb>` `nodes/proxy` of the Pod's Node (verb from the HTTP method), cached like
  kubelet's (allowed 5 min, denied 30 s); denied is 403 with kubelet's text.

What it answers:

- `GET /containerLogs/{namespace}/{pod}/{container}`: a module has no stdout of its own (it runs in
  the base's JVM), so the "log" is what is known about it, one timestamped line each: the Pod's Events
  from koupleless-provider that concern this module (its install/uninstall history), what the base
  reports for it, and the container's state from the Pod status. `tailLines`, `sinceSeconds`,
  `sinceTime`, `timestamps` (kubelet's RFC3339Nano stamps) and `limitBytes` are honoured; `follow`
  returns what exists and ends; `previous` and `stream` are ignored.
- `/exec`, `/attach`, `/run`, `/portForward` (any method, upgrade requests included): one sentence,
  never an upgrade, saying the module runs inside its base's JVM and naming the base. kube-apiserver
  hands it to `kubectl exec` as `error: Internal error occurred: unable to upgrade connection: <it>`.
- `/healthz`: ok, without a client certificate (a probe's). Anything else: 404.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import re
import ssl
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import Counter

from koupleless import keys
from koupleless.http import ReloadingTLS, serve
from koupleless.kube.client import ApiError, event_path, pod_path, resource_path
from koupleless.kube.lease import parse_micro_time
from provider.state import BaseState

log = logging.getLogger(__name__)

#: The Events shown are this component's (provider.controller.COMPONENT).
EVENT_SOURCE = "koupleless-provider"
DEFAULT_PORT = 10250
#: Where a Pod's ServiceAccount CA is mounted: on kubeadm clusters it also signs kube-apiserver's
#: kubelet client certificate, so it is the default --kubelet-client-ca in a cluster.
IN_CLUSTER_CA = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
SAR_PATH = resource_path("authorization.k8s.io/v1", "subjectaccessreviews")
#: kubelet's --authorization-webhook-cache-authorized-ttl / -unauthorized-ttl defaults.
ALLOWED_TTL_S = 300.0
DENIED_TTL_S = 30.0
CACHE_LIMIT = 1024

STREAMING = ("exec", "attach", "run", "portForward")
REQUESTS = Counter("koupleless_provider_kubelet_api_requests_total",
                   "Requests to the virtual Nodes' kubelet API, by endpoint and answer", ["endpoint", "code"])
NO_CONTAINER = {
    "exec": "there is no container to exec into or attach to; use the base's own tools (arthas, its logs) instead",
    "attach": "there is no container to exec into or attach to; use the base's own tools (arthas, its logs) instead",
    "run": "there is no container to exec into or attach to; use the base's own tools (arthas, its logs) instead",
    "portForward": "there is no container to forward ports from; the module serves on the base's own ports, "
    "reach them at the base's address",
}


# --- who is asking ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    user: str
    groups: tuple[str, ...] = ()


def peer_identity(request: web.Request) -> Identity | None:
    """The verified TLS client certificate as Kubernetes' x509 authenticator reads it: CN is the
    user, each O a group. None without one (the TLS layer already refused any other CA's)."""
    transport = request.transport
    cert = transport.get_extra_info("peercert") if transport is not None else None
    if not cert:
        return None
    user, groups = "", []
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                user = value
            elif key == "organizationName":
                groups.append(value)
    if not user:
        return None
    return Identity(user, (*groups, "system:authenticated"))


class Authorizer(Protocol):
    async def allowed(self, who: Identity, verb: str, node: str) -> bool: ...


class AuthorizationError(Exception):
    pass


class AlwaysAllow:
    async def allowed(self, who: Identity, verb: str, node: str) -> bool:
        return True


class SubjectAccessReviewer:
    """kubelet's Webhook authorization: may `who` `<verb>` `nodes/proxy` of `node`? Answers are
    cached (allowed 5 min, denied 30 s), so a `kubectl logs -f` loop costs one review."""

    def __init__(self, kube: Any, *, allowed_ttl: float = ALLOWED_TTL_S, denied_ttl: float = DENIED_TTL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.kube = kube
        self.allowed_ttl = allowed_ttl
        self.denied_ttl = denied_ttl
        self.clock = clock
        self._cache: OrderedDict[tuple[str, tuple[str, ...], str, str], tuple[bool, float]] = OrderedDict()

    async def allowed(self, who: Identity, verb: str, node: str) -> bool:
        key = (who.user, who.groups, verb, node)
        hit = self._cache.get(key)
        now = self.clock()
        if hit is not None and hit[1] > now:
            return hit[0]
        body = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {
                "user": who.user,
                "groups": list(who.groups),
                "resourceAttributes": {"verb": verb, "version": "v1", "resource": "nodes",
                                       "subresource": "proxy", "name": node},
            },
        }
        try:
            review = await self.kube.create(SAR_PATH, body)
        except (TimeoutError, ApiError, OSError) as exc:
            raise AuthorizationError(str(exc)) from exc
        allowed = bool((review.get("status") or {}).get("allowed"))
        self._cache[key] = (allowed, now + (self.allowed_ttl if allowed else self.denied_ttl))
        self._cache.move_to_end(key)
        while len(self._cache) > CACHE_LIMIT:
            self._cache.popitem(last=False)
        return allowed


def _verb(method: str) -> str:
    """kubelet's mapping of HTTP methods to authorization verbs."""
    return {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(method, "get")


# --- what is known about a module -------------------------------------------------------------------


class KubeReader(Protocol):
    async def get(self, path: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]: ...

    async def list(self, path: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]: ...


@dataclass
class Sources:
    """Where the answers come from: the API server (the provider's own client), the provider's Pod
    cache (a miss asks the API server) and its bases."""

    kube: KubeReader
    cached_pod: Callable[[str], dict[str, Any] | None] = lambda _key: None
    base_for_node: Callable[[str], BaseState | None] = lambda _node: None
    now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)

    async def pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        pod = self.cached_pod(f"{namespace}/{name}")
        if pod is not None:
            return pod
        try:
            return await self.kube.get(pod_path(namespace, name))
        except ApiError as exc:
            if exc.not_found:
                return None
            raise

    async def events(self, pod: dict[str, Any]) -> list[dict[str, Any]]:
        meta = pod.get("metadata") or {}
        listed = await self.kube.list(event_path(meta.get("namespace") or "default"),
                                      {"fieldSelector": f"involvedObject.uid={meta.get('uid', '')}"})
        return [e for e in listed.get("items") or [] if isinstance(e, dict) and _from_provider(e)]


def _from_provider(event: dict[str, Any]) -> bool:
    source = (event.get("source") or {}).get("component")
    return EVENT_SOURCE in (source, event.get("reportingComponent"), event.get("reportingController"))


@dataclass(frozen=True)
class Line:
    at: dt.datetime
    text: str


def stamp(t: dt.datetime, nano: bool = False) -> str:
    t = t.astimezone(dt.UTC)
    if nano:  # kubelet's --timestamps format (RFC3339Nano)
        return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond * 1000:09d}Z"
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _mentions(message: str, biz_name: str) -> bool:
    """The message names module `biz_name` (as a biz key `name:version`, how the provider writes it)."""
    return re.search(rf"(?<![\w.-]){re.escape(biz_name)}:", message) is not None


def event_lines(events: list[dict[str, Any]], container: str, others: list[str]) -> list[Line]:
    """The Events about this module: those naming it, and those naming no other module of the Pod
    (about the Pod as a whole)."""
    out: list[tuple[dt.datetime, str, Line]] = []
    for e in events:
        message = str(e.get("message") or "")
        if not _mentions(message, container) and any(_mentions(message, o) for o in others):
            continue
        first = parse_micro_time(e.get("firstTimestamp")) or parse_micro_time(e.get("eventTime")) \
            or parse_micro_time((e.get("metadata") or {}).get("creationTimestamp"))
        if first is None:
            continue
        text = f"{e.get('reason') or 'Event'}: {message}"
        count = e.get("count") or 1
        last = parse_micro_time(e.get("lastTimestamp"))
        if isinstance(count, int) and count > 1:
            text += f" (x{count}, last at {stamp(last)})" if last else f" (x{count})"
        out.append((first, str((e.get("metadata") or {}).get("name") or ""), Line(first, text)))
    out.sort(key=lambda item: (item[0], item[1]))
    return [line for _, _, line in out]


def base_lines(base: BaseState | None, base_id: str, container: str, now: dt.datetime) -> list[Line]:
    """What the base itself reports for the module now: its state, since when, the base's reason
    and message."""
    if base is None:
        return [Line(now, f"base {base_id}: not heard from by this provider")]
    records = sorted((r for r in base.bizs.values() if r.name == container), key=lambda r: r.version)
    if not records:
        said = "holds no module " + container if base.inventory_known else "module list not received yet"
        return [Line(now, f"base {base_id}: {said}")]
    out = []
    for r in records:
        ms = r.change_time_ms or r.ts
        text = f"base {base_id} reports {r.name}:{r.version} {r.state}"
        if ms:
            text += f" since {stamp(dt.datetime.fromtimestamp(ms / 1000, dt.UTC))}"
        detail = ": ".join(x for x in (r.reason, r.message) if x)
        out.append(Line(now, f"{text} ({detail})" if detail else text))
    return out


def status_lines(pod: dict[str, Any], container: str, now: dt.datetime) -> list[Line]:
    status = pod.get("status") or {}
    out = []
    if status.get("reason"):
        detail = ": ".join(str(x) for x in (status.get("reason"), status.get("message")) if x)
        out.append(Line(now, f"status: Pod {status.get('phase') or 'Unknown'}: {detail}"))
    cs = next((c for c in status.get("containerStatuses") or []
               if isinstance(c, dict) and c.get("name") == container), None)
    state = (cs or {}).get("state") or {}
    if "running" in state:
        since = (state.get("running") or {}).get("startedAt") or "?"
        ready = "Ready" if (cs or {}).get("ready") else "not Ready"
        out.append(Line(now, f"status: running since {since} ({ready})"))
    elif "waiting" in state or "terminated" in state:
        kind = "waiting" if "waiting" in state else "terminated"
        detail = ": ".join(str(x) for x in ((state.get(kind) or {}).get("reason"),
                                            (state.get(kind) or {}).get("message")) if x)
        out.append(Line(now, f"status: {kind}: {detail}" if detail else f"status: {kind}"))
    elif not out:
        out.append(Line(now, f"status: Pod {status.get('phase') or 'Pending'}, no state reported for module "
                             f"{container} yet"))
    return out


@dataclass(frozen=True)
class LogOptions:
    tail_lines: int | None = None
    since: dt.datetime | None = None
    timestamps: bool = False
    limit_bytes: int | None = None

    @classmethod
    def from_query(cls, query: Mapping[str, str], now: dt.datetime) -> LogOptions:
        """kubelet's query parameters; a value that does not parse is ignored, as are the ones a
        module has no use for (follow: what exists is returned and the stream ends)."""

        def number(name: str) -> int | None:
            with contextlib.suppress(KeyError, ValueError):
                n = int(query[name])
                return n if n >= 0 else None
            return None

        tail = number("tailLines")
        if tail is None:
            tail = number("tail")  # kubelet's older spelling
        since = None
        seconds = number("sinceSeconds")
        if seconds is not None:
            since = now - dt.timedelta(seconds=seconds)
        elif query.get("sinceTime"):
            since = parse_micro_time(query["sinceTime"])
        return cls(tail_lines=tail, since=since, timestamps=query.get("timestamps", "").lower() in ("true", "1"),
                   limit_bytes=number("limitBytes"))

    def render(self, lines: list[Line]) -> bytes:
        if self.since is not None:
            since = self.since
            lines = [line for line in lines if line.at >= since]
        if self.tail_lines is not None:
            lines = lines[len(lines) - self.tail_lines:] if self.tail_lines else []
        body = "".join(f"{stamp(line.at, self.timestamps)} {line.text}\n" for line in lines).encode()
        return body[: self.limit_bytes] if self.limit_bytes is not None else body


# --- the app ---------------------------------------------------------------------------------------


def _text(status: int, text: str) -> web.Response:
    resp = web.Response(status=status, text=text, content_type="text/plain")
    resp.force_close()  # an upgrade request's connection is not reused after a refusal
    return resp


def create_app(sources: Sources, *, authorizer: Authorizer | None = None,
               authenticate: Callable[[web.Request], Identity | None] = peer_identity) -> web.Application:
    authz: Authorizer = authorizer or AlwaysAllow()

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def find(request: web.Request, namespace: str, name: str) -> tuple[dict[str, Any] | None, web.Response | None]:
        """The Pod, if bound to a virtual Node (kubelet knows only the Pods bound to it), once the
        client is authenticated and authorized; or the answer to give instead (401, 403, 404, 500,
        503). Authorization comes before "no such Pod", so a client that may not ask learns nothing."""
        who = authenticate(request)
        if who is None:
            return None, _text(401, "Unauthorized")
        try:
            pod = await sources.pod(namespace, name)
        except (TimeoutError, ApiError, OSError) as exc:
            log.warning("kubelet API: reading Pod %s/%s failed: %s", namespace, name, exc)
            return None, _text(503, f"cannot read Pod {namespace}/{name} from the API server: {exc}")
        node = str(((pod or {}).get("spec") or {}).get("nodeName") or "")
        if not node.startswith(keys.VNODE_NAME_PREFIX):
            pod, node = None, ""
        verb = _verb(request.method)
        try:
            ok = await authz.allowed(who, verb, node)
        except AuthorizationError as exc:
            log.warning("kubelet API: SubjectAccessReview for %s failed: %s", who.user, exc)
            return None, _text(500, f"Authorization error (user={who.user}, verb={verb}, resource=nodes, "
                                    f"subresource=proxy)")
        if not ok:
            return None, _text(403, f"Forbidden (user={who.user}, verb={verb}, resource=nodes, "
                                    f"subresource(s)=[proxy])\n")
        if pod is None:
            return None, _text(404, f'pod "{name}" does not exist')
        return pod, None

    def containers(pod: dict[str, Any]) -> list[str]:
        return [str(c.get("name")) for c in (pod.get("spec") or {}).get("containers") or []
                if isinstance(c, dict) and c.get("name")]

    async def container_logs(request: web.Request) -> web.Response:
        m = request.match_info
        pod, refused = await find(request, m["namespace"], m["pod"])
        if refused is not None:
            return refused
        assert pod is not None
        container = m["container"]
        names = containers(pod)
        if container not in names:
            return _text(404, f'container "{container}" not found in pod "{m["pod"]}"')
        now = sources.now()
        node = str((pod.get("spec") or {}).get("nodeName") or "")
        base = sources.base_for_node(node)
        base_id = base.base_id if base else node.removeprefix(keys.VNODE_NAME_PREFIX)
        lines: list[Line] = []
        try:
            lines += event_lines(await sources.events(pod), container, [n for n in names if n != container])
        except (TimeoutError, ApiError, OSError) as exc:
            log.warning("kubelet API: listing Events of Pod %s/%s failed: %s", m["namespace"], m["pod"], exc)
            lines.append(Line(now, f"events: cannot be read from the API server ({exc})"))
        lines += base_lines(base, base_id, container, now)
        lines += status_lines(pod, container, now)
        body = LogOptions.from_query(request.query, now).render(lines)
        return web.Response(body=body, content_type="text/plain", charset="utf-8")

    async def streaming(request: web.Request) -> web.Response:
        kind = request.match_info["kind"]
        parts = [p for p in request.match_info["rest"].split("/") if p]
        if kind not in STREAMING or len(parts) < 2:
            return _text(404, "404 page not found")
        namespace, name = parts[0], parts[1]
        pod, refused = await find(request, namespace, name)
        if refused is not None:
            return refused
        assert pod is not None
        names = containers(pod)
        # /{kind}/{ns}/{pod}/{container} or /{kind}/{ns}/{pod}/{uid}/{container}; portForward has none.
        container = parts[-1] if kind != "portForward" and len(parts) >= 3 else ""
        if container and container not in names:
            return _text(404, f'container "{container}" not found in pod "{name}"')
        return _text(400, no_container_sentence(kind, pod, [container] if container else names,
                                                sources.base_for_node(str(pod["spec"].get("nodeName") or ""))))

    async def not_found(_: web.Request) -> web.Response:
        return _text(404, "404 page not found")

    @web.middleware
    async def count(request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
        endpoint = request.path.split("/", 2)[1]
        endpoint = endpoint if endpoint in (*STREAMING, "containerLogs", "healthz") else "other"
        try:
            resp: web.StreamResponse = await handler(request)
        except web.HTTPException as exc:
            REQUESTS.labels(endpoint, str(exc.status)).inc()
            raise
        except Exception:
            REQUESTS.labels(endpoint, "500").inc()
            log.exception("kubelet API: %s %s failed", request.method, request.path)
            return _text(500, "internal error")
        REQUESTS.labels(endpoint, str(resp.status)).inc()
        return resp

    app = web.Application(middlewares=[count])
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/containerLogs/{namespace}/{pod}/{container}", container_logs)
    app.router.add_route("*", "/{kind:exec|attach|run|portForward}/{rest:.*}", streaming)
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app


def no_container_sentence(kind: str, pod: dict[str, Any], modules: list[str], base: BaseState | None) -> str:
    """The one answer to exec, attach, run and port-forward."""
    meta = pod.get("metadata") or {}
    node = str((pod.get("spec") or {}).get("nodeName") or "")
    base_id = base.base_id if base else node.removeprefix(keys.VNODE_NAME_PREFIX)
    ip = (base.ip if base else "") or str((pod.get("status") or {}).get("hostIP") or "") or "address unknown"
    which = f"module {modules[0]}" if len(modules) == 1 else f"modules {', '.join(modules)}"
    runs = "runs" if len(modules) == 1 else "run"
    return (f"{which} of Pod {meta.get('namespace')}/{meta.get('name')} {runs} inside the JVM of base {base_id} "
            f"(Node {node}, {ip}): {NO_CONTAINER.get(kind, NO_CONTAINER['exec'])}")


# --- the server -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class KubeletSettings:
    port: int
    #: What every virtual Node advertises (its Hostname address): kube-apiserver dials this.
    address: str
    client_ca: str
    bind: str = "0.0.0.0"
    cert_file: str | None = None
    key_file: str | None = None
    #: "webhook" (SubjectAccessReview) or "alwaysallow" (any client the CA vouches for).
    authorization: str = "webhook"


class KubeletTLS(ReloadingTLS):
    """The serving certificate follows its files (as the webhook's); clients must present a
    certificate signed by the client CA to get past /healthz."""

    def __init__(self, cert_file: str, key_file: str, client_ca: str, poll_interval: float = 1.0) -> None:
        super().__init__(cert_file, key_file, poll_interval)
        self.context.verify_mode = ssl.CERT_OPTIONAL
        self.context.load_verify_locations(cafile=client_ca)


def self_signed_tls(address: str, client_ca: str) -> KubeletTLS:
    """A serving certificate made now, for `address` and localhost, when none is given. kube-apiserver
    accepts it unless it runs with --kubelet-certificate-authority. Written to memory-only files
    (memfd) where the OS has them, so a read-only root filesystem is no obstacle."""
    import ipaddress

    from certs import pki

    ca = pki.new_ca("koupleless-provider-kubelet-self-signed", days=3650)
    dns, ips = ["localhost"], ["127.0.0.1"]
    try:
        ipaddress.ip_address(address)
        ips.append(address)
    except ValueError:
        dns.append(address)
    pair = pki.issue(ca, "koupleless-provider-kubelet", dns_names=sorted(set(dns)), ips=sorted(set(ips)),
                     days=3650)
    chain = pair.cert_pem + ca.cert_pem
    if hasattr(os, "memfd_create"):
        fds = [os.memfd_create("kubelet-tls.crt"), os.memfd_create("kubelet-tls.key")]
        try:
            os.write(fds[0], chain)
            os.write(fds[1], pair.key_pem)
            return KubeletTLS(f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}", client_ca)
        finally:
            for fd in fds:
                os.close(fd)
    with tempfile.TemporaryDirectory(prefix="kubelet-tls-") as d:
        pki.write_file(Path(d) / "tls.crt", chain)
        pki.write_file(Path(d) / "tls.key", pair.key_pem, private=True)
        return KubeletTLS(str(Path(d) / "tls.crt"), str(Path(d) / "tls.key"), client_ca)


class KubeletServer:
    """The kubelet API over TLS on --kubelet-bind-address:--kubelet-port."""

    def __init__(self, settings: KubeletSettings, sources: Sources, authorizer: Authorizer | None = None) -> None:
        self.settings = settings
        self.sources = sources
        self.authorizer = authorizer
        self.tls: KubeletTLS | None = None
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        """Raises OSError / ssl.SSLError / ValueError naming what is wrong (port taken, bad files)."""
        s = self.settings
        if s.cert_file and s.key_file:
            self.tls = KubeletTLS(s.cert_file, s.key_file, s.client_ca)
            self.tls.start()
        else:
            self.tls = self_signed_tls(s.address, s.client_ca)
        authorizer = self.authorizer
        if authorizer is None and s.authorization == "webhook":
            authorizer = SubjectAccessReviewer(self.sources.kube)
        app = create_app(self.sources, authorizer=authorizer or AlwaysAllow())
        try:
            self._runner, self.port = await serve(app, s.bind, s.port, self.tls.context)
        except BaseException:
            await self.stop()
            raise
        log.info("kubelet API for virtual Nodes on %s:%d (Nodes advertise %s:%d), clients from %s, "
                 "authorization %s", s.bind, self.port, s.address, s.port, s.client_ca, s.authorization)

    async def stop(self) -> None:
        if self.tls is not None:
            await self.tls.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

