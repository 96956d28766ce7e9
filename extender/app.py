"""The extender's HTTP server: POST /filter, /prioritize and /bind in the scheduler-extender wire
format, plus /healthz, /readyz and /metrics.

Two modes, chosen per request by what the scheduler sends:
- names (nodeCacheCapable: true): bases and their modules come from the watch cache;
- full Nodes (nodeCacheCapable: false): bases come from the request; modules from the watch cache
  when there is one, else from the provider's annotation on each Node.

Every answer is HTTP 200 — the scheduler ignores the body of anything else — and a request that
cannot be read is answered with `Error` naming the field and the fix, which the scheduler then
shows in the Pod's FailedScheduling event.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from aiohttp import web
from prometheus_client import Counter, Histogram

from extender import policy, wire
from extender.policy import FilterOutcome, Strategy
from extender.state import BaseInfo, BaseUsage, ModulePod
from extender.view import ClusterView
from koupleless import keys
from koupleless.http import add_health_routes

log = logging.getLogger(__name__)

REQUESTS = Counter(
    "koupleless_extender_requests_total",
    "Extender calls by verb and outcome (ok, bad_request, error).",
    ["verb", "outcome"],
)
REQUEST_SECONDS = Histogram(
    "koupleless_extender_request_duration_seconds",
    "Time to answer an extender call, by verb.",
    ["verb"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
REJECTIONS = Counter(
    "koupleless_extender_rejections_total",
    "Bases the filter turned down for a module Pod, by reason kind.",
    ["reason"],
)
BINDS = Counter(
    "koupleless_extender_binds_total",
    "Bindings done by the extender, by outcome (bound, refused, failed).",
    ["outcome"],
)
BURST_WAITS = Counter(
    "koupleless_extender_burst_waits_total",
    "Filters that waited for an in-flight module Pod's binding before answering, by outcome (settled, timeout).",
    ["outcome"],
)

#: Body size cap: a full-Node request carries every candidate Node (a Node can exceed 15 kB).
DEFAULT_MAX_BODY = 256 * 2**20


class Binder(Protocol):
    async def bind(self, namespace: str, name: str, uid: str, node: str) -> None: ...
    async def get_pod(self, namespace: str, name: str) -> dict[str, Any]: ...


@dataclass
class Settings:
    strategy: Strategy = "spread"
    #: Longest a filter waits for an in-flight Pod's binding (keeps a burst from overbooking).
    burst_wait: float = 1.0
    #: Longest a filter waits for a virtual Node the scheduler names but the watch has not delivered.
    node_wait: float = 1.0


def _json(data: Any) -> web.Response:
    return web.Response(body=orjson.dumps(data), content_type="application/json")


class Extender:
    def __init__(
        self,
        view: ClusterView | None = None,
        *,
        binder: Binder | None = None,
        settings: Settings | None = None,
        watches_pods: bool | None = None,
        reserves: Callable[[], bool] | None = None,
    ) -> None:
        """`reserves()`: whether this replica is the one kube-scheduler is meant to reach (it leads, or
        there is no election). Such a replica passes one base per module Pod and counts the Pod there
        at once; any other passes every best base and promises nothing (see `filter`)."""
        self.view = view
        self.binder = binder
        self.settings = settings or Settings()
        #: Whether `view.usage` reflects bound module Pods (a Pod watch, or bindings we did).
        self.watches_pods = view is not None if watches_pods is None else watches_pods
        self.reserves = reserves or (lambda: False)

    # --- the decisions, over parsed arguments (also what the tests and the bench call) ----------

    def _usage_for_request(self, bases: dict[str, BaseInfo] | None) -> Callable[[str], BaseUsage | None]:
        if self.view is not None and self.watches_pods:
            return self.view.usage.get_fast
        if bases is None:
            return lambda _name: None
        # No Pod watch: the provider's own count on each Node is all there is.
        return lambda name: policy.annotated_usage(bases[name]) if name in bases else None

    def _request_bases(self, args: wire.ExtenderArgs) -> dict[str, BaseInfo] | None:
        if args.nodes is None:
            return None
        return {wire.node_name(n): BaseInfo.from_node(n) for n in args.nodes}

    def _check_names_mode(self) -> str | None:
        if self.view is None:
            return ("the scheduler sent NodeNames (nodeCacheCapable: true) but this extender has no watch "
                    "cache: start it with --kubeconfig, or register it with nodeCacheCapable: false")
        if not self.view.synced:
            return "the extender's watch of Nodes and module Pods is still syncing; the scheduler will retry"
        return None

    async def filter(self, args: wire.ExtenderArgs) -> dict[str, Any]:
        """The bases that can take the Pod, and why each other one cannot.

        A reserving replica passes the single best base and counts the Pod on it before answering:
        kube-scheduler can only bind it there, so the next Pod's filter already sees it, and nothing
        has to wait for a binding (no bindVerb needed). A replica that does not reserve passes every
        base ranked first and marks the Pod in flight, so a filter that follows waits (briefly) until
        a binding or the watch says where it went."""
        pod = ModulePod.from_pod(args.pod)
        bases = self._request_bases(args)
        if bases is None:
            problem = self._check_names_mode()
            if problem is not None and pod.is_module:
                return wire.filter_error(problem)
        if not pod.is_module:
            return wire.filter_result(args, args.names, {})
        usage_of = self._usage_for_request(bases)
        names = args.names
        view = self.view
        #: names mode with a Pod watch: the cache counts modules, so Pods can be reserved or waited for.
        counted = bases is None and view is not None and self.watches_pods
        reserving = counted and self.reserves()
        if reserving:
            assert view is not None
            # A Pod filtered again (its binding failed, or another plugin turned the base down) must
            # not find its own earlier reservation in the way.
            view.usage.unassume(pod.key)

        candidates = set(names) if bases is None else None
        #: candidates that are not known bases, when the view has been checked (one set difference
        #: per look, shared with the indexed filter).
        unknown: set[str] | None = None

        def run() -> FilterOutcome:
            if bases is None and view is not None and self.watches_pods:
                fast = policy.filter_indexed(pod, names, view, candidates, unknown)
                if fast is not None:
                    return fast
            lookup = bases.get if bases is not None else view.bases.get  # type: ignore[union-attr]
            return policy.filter_pod(pod, ((n, lookup(n)) for n in names), usage_of)

        if bases is None and view is not None:
            assert candidates is not None
            # A dict argument takes set.difference's fast path (the strings' cached hashes).
            unknown = candidates.difference(view.bases)
            awaited = [n for n in unknown if n.startswith(keys.VNODE_NAME_PREFIX)]
            if awaited:
                await view.wait_for_bases(awaited, self.settings.node_wait)
                unknown = candidates.difference(view.bases)
        outcome = run()
        if counted:
            assert view is not None
            others = view.inflight_others(pod.key)
            if others and view.inflight_overlaps(outcome.passing, others):
                settled = await view.settle(pod.key, self.settings.burst_wait)
                BURST_WAITS.labels("settled" if settled else "timeout").inc()
                assert candidates is not None
                unknown = candidates.difference(view.bases)  # bases may have come or gone meanwhile
                outcome = run()
        best = self._best(pod, outcome.passing, bases)
        if reserving and best:
            assert view is not None
            best = best[:1]
            view.assume(pod, best[0])
        elif counted and best:
            assert view is not None
            view.begin_inflight(pod, best)
        for kind, count in outcome.kinds.items():
            REJECTIONS.labels(kind).inc(count)
        if outcome.failed and log.isEnabledFor(logging.DEBUG):
            log.debug("pod %s: %d of %d nodes rejected: %s", pod.key, len(outcome.failed), len(names),
                      policy.fit_error_message(len(names), outcome.failed))
        return wire.filter_result(args, best, outcome.failed)

    def _best(self, pod: ModulePod, passing: list[str], bases: dict[str, BaseInfo] | None) -> list[str]:
        """The passing bases the strategy ranks first (`policy.best_bases`): all the filter passes."""
        if len(passing) <= 1:
            return passing
        return policy.best_bases(pod, passing, *self._ranking(pod, bases))

    def _ranking(self, pod: ModulePod, bases: dict[str, BaseInfo] | None) -> tuple[
            Callable[[str], BaseInfo | None], Callable[[str], BaseUsage | None], Strategy, set[str] | None]:
        """What ranking bases reads: the bases, their usage, the strategy, and the bases holding the
        Pod's bizNames when the view has them indexed."""
        if bases is not None:
            base_of: Callable[[str], BaseInfo | None] = bases.get
        elif self.view is not None:
            base_of = self.view.bases.get
        else:
            base_of = lambda _name: None  # noqa: E731
        holding = self.view.usage.holding(pod.biz_names) if self.view is not None and self.watches_pods else None
        return base_of, self._usage_for_request(bases), self.settings.strategy, holding

    def _module_pod(self, raw: dict[str, Any]) -> ModulePod:
        """The Pod just filtered is prioritized next: reuse what was read from it then."""
        if self.view is not None:
            meta = raw.get("metadata")
            if isinstance(meta, dict):
                known = self.view.inflight_pod(f"{meta.get('namespace', '')}/{meta.get('name', '')}")
                if known is not None and known.uid and known.uid == meta.get("uid"):
                    return known
        return ModulePod.from_pod(raw)

    def prioritize(self, args: wire.ExtenderArgs) -> list[dict[str, Any]]:
        """Not in the shipped registration (the filter passes only the best bases); still answered
        for a configuration that keeps prioritizeVerb."""
        pod = self._module_pod(args.pod)
        scores = policy.prioritize_pod(pod, args.names, *self._ranking(pod, self._request_bases(args)))
        return wire.priority_list(scores)

    async def bind(self, args: wire.BindingArgs) -> dict[str, Any]:
        if self.binder is None:
            BINDS.labels("failed").inc()
            return wire.binding_result(
                "this extender has no kubeconfig, so it cannot bind: start it with --kubeconfig, or remove "
                "bindVerb from its entry in the KubeSchedulerConfiguration"
            )
        key = f"{args.pod_namespace}/{args.pod_name}"
        view = self.view
        pod = view.inflight_pod(key) if view is not None else None
        if pod is None:
            try:
                pod = ModulePod.from_pod(await self.binder.get_pod(args.pod_namespace, args.pod_name))
            except Exception as exc:
                BINDS.labels("failed").inc()
                return wire.binding_result(f"cannot read pod {key} to bind it: {exc}")
        if view is not None and pod.is_module:
            refusal = self._refuse_binding(pod, args.node)
            if refusal:
                BINDS.labels("refused").inc()
                view.end_inflight(key)
                log.info("refused to bind %s to %s: %s", key, args.node, refusal)
                return wire.binding_result(f"not binding {key} to {args.node}: {refusal}; the scheduler will retry")
            view.assume(pod, args.node)
        try:
            await self.binder.bind(args.pod_namespace, args.pod_name, args.pod_uid, args.node)
        except Exception as exc:
            if view is not None:
                view.usage.unassume(key)
            BINDS.labels("failed").inc()
            log.warning("binding %s to %s failed: %s", key, args.node, exc)
            return wire.binding_result(f"binding {key} to {args.node} failed: {exc}")
        BINDS.labels("bound").inc()
        return wire.binding_result()

    def _refuse_binding(self, pod: ModulePod, node: str) -> str | None:
        """The last word against overbooking: re-check the chosen base with everything bound so far."""
        assert self.view is not None
        placed = self.view.usage.placed(pod.key)
        if placed is not None and placed.node == node:
            return None  # a retried bind of a Pod we already count there
        outcome = policy.filter_pod(pod, [(node, self.view.bases.get(node))], self.view.usage_of)
        return outcome.failed.get(node)

    # --- HTTP ----------------------------------------------------------------------------------

    async def _handle(self, verb: str, request: web.Request, call: Callable[[bytes], Any],
                      bad: Callable[[str], web.Response]) -> web.Response:
        started = time.perf_counter()
        try:
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge as exc:
                raise wire.BadRequest(
                    "body", f"is too large ({request.content_length} bytes)",
                    "register the extender with nodeCacheCapable: true, or start it with a larger --max-body-bytes",
                ) from exc
            result = call(body)
            if hasattr(result, "__await__"):
                result = await result
        except wire.BadRequest as exc:
            REQUESTS.labels(verb, "bad_request").inc()
            log.warning("bad %s request from %s: %s", verb, request.remote, exc)
            return bad(f"malformed {verb} request: {exc}")
        except Exception as exc:
            REQUESTS.labels(verb, "error").inc()
            log.exception("%s failed", verb)
            return bad(f"extender {verb} failed: {type(exc).__name__}: {exc}")
        finally:
            REQUEST_SECONDS.labels(verb).observe(time.perf_counter() - started)
        REQUESTS.labels(verb, "ok").inc()
        return _json(result)

    async def handle_filter(self, request: web.Request) -> web.Response:
        return await self._handle(
            "filter", request, lambda b: self.filter(wire.parse_extender_args(b)),
            lambda msg: _json(wire.filter_error(msg)),
        )

    async def handle_prioritize(self, request: web.Request) -> web.Response:
        # HostPriorityList has no error field: a 400 makes the scheduler skip our scores (and log why).
        return await self._handle(
            "prioritize", request, lambda b: self.prioritize(wire.parse_extender_args(b)),
            lambda msg: web.json_response({"Error": msg}, status=400),
        )

    async def handle_bind(self, request: web.Request) -> web.Response:
        return await self._handle(
            "bind", request, lambda b: self.bind(wire.parse_binding_args(b)),
            lambda msg: _json(wire.binding_result(msg)),
        )

    def ready(self) -> bool:
        # Leading is not part of it: the Service picks the leader by its Pod label, so every replica
        # is Ready once synced, and rollouts, `rollout status` and drains work as for any Deployment.
        return self.view is None or self.view.synced


def make_app(extender: Extender, *, max_body: int = DEFAULT_MAX_BODY) -> web.Application:
    app = web.Application(client_max_size=max_body)
    app.router.add_post("/filter", extender.handle_filter)
    app.router.add_post("/prioritize", extender.handle_prioritize)
    app.router.add_post("/bind", extender.handle_bind)
    add_health_routes(app, extender.ready)
    return app
