"""The webhook's aiohttp application: POST /mutate, plus /healthz, /readyz and /metrics.

A body that is not an AdmissionReview with a uid cannot be answered in kind, so it gets HTTP 400
and a plain-text reason; anything with a uid gets a well-formed AdmissionReview back, whatever
else is wrong with it.
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterator
from itertools import accumulate
from typing import Any

from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    gc_collector,
    platform_collector,
    process_collector,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from koupleless.http import add_health_routes
from webhook.admission import (
    BadReview,
    Decision,
    Review,
    Unreadable,
    decide,
    encode_response,
    read_review,
)
from webhook.defaults import Defaults
from webhook.verdicts import VERDICT_COUNTS, Result

log = logging.getLogger(__name__)

#: The apiserver never sends more than this (controller-runtime's cap too); aiohttp answers 413 above it.
MAX_BODY_BYTES = 7 * 1024 * 1024
MUTATE_PATH = "/mutate"


#: Upper bounds of the admission latency histogram, seconds.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
RESULTS: tuple[Result, ...] = ("allowed", "patched", "denied", "error")


class AdmissionStats(Collector):
    """Admissions by result and their latency, kept in plain numbers and exported on scrape.

    prometheus_client's Counter and Histogram take a lock on every update, about a tenth of an
    admission's own time here; this process updates them from its one event-loop thread only.
    """

    def __init__(self) -> None:
        self.results: dict[str, int] = dict.fromkeys(RESULTS, 0)
        #: one per bound, then the +Inf bucket; not cumulative (collect() adds them up)
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.seconds = 0.0

    def record(self, result: Result, seconds: float) -> None:
        self.results[result] += 1
        self.buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.seconds += seconds

    def collect(self) -> Iterator[Metric]:
        admissions = CounterMetricFamily(
            "koupleless_webhook_admissions",
            "AdmissionReviews answered, by result: allowed (untouched), patched, denied, error (malformed request)",
            labels=["result"],
        )
        for result, count in self.results.items():
            admissions.add_metric([result], count)
        yield admissions
        latency = HistogramMetricFamily(
            "koupleless_webhook_admission_duration_seconds",
            "Time from request received to response body ready, for requests answered with an AdmissionReview",
        )
        cumulative = list(accumulate(self.buckets))
        bounds = [*(str(b) for b in LATENCY_BUCKETS), "+Inf"]
        latency.add_metric([], list(zip(bounds, cumulative, strict=True)), self.seconds)
        yield latency
        verdicts = CounterMetricFamily(
            "koupleless_webhook_new_pod_verdicts",
            "New module Pods by how they were judged: reused (a kept verdict for the same spec, as a release's "
            "replicas share) or judged (a spec not seen lately)",
            labels=["verdict"],
        )
        verdicts.add_metric(["reused"], VERDICT_COUNTS.reused)
        verdicts.add_metric(["judged"], VERDICT_COUNTS.judged)
        yield verdicts


class WebhookMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.stats = AdmissionStats()
        registry.register(self.stats)
        self.bad_requests = Counter(
            "koupleless_webhook_bad_requests",
            "Bodies answered with HTTP 400 because they are not an AdmissionReview, by the field at fault",
            ["field"],
            registry=registry,
        )


DEFAULTS = web.AppKey("webhook_defaults", Defaults)
METRICS = web.AppKey("webhook_metrics", WebhookMetrics)


def new_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    process_collector.ProcessCollector(registry=registry)
    platform_collector.PlatformCollector(registry=registry)
    gc_collector.GCCollector(registry=registry)
    return registry


def create_app(
    defaults: Defaults,
    *,
    registry: CollectorRegistry | None = None,
    ready: Callable[[], bool] = lambda: True,
) -> web.Application:
    registry = registry or new_registry()
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[DEFAULTS] = defaults
    app[METRICS] = metrics = WebhookMetrics(registry)
    app.router.add_post(MUTATE_PATH, mutate_handler(defaults, metrics))
    add_health_routes(app, ready, registry)
    return app


def mutate_handler(
    defaults: Defaults, metrics: WebhookMetrics
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """POST /mutate. Everything it needs is bound here once, not looked up per request: this is the
    one hot path of the process."""
    record = metrics.stats.record
    perf_counter = time.perf_counter

    async def mutate(request: web.Request) -> web.Response:
        started = perf_counter()
        body = await request.read()
        try:
            review = read_review(body)
        except BadReview as exc:
            return _bad_request(request, exc.field, str(exc))
        decision = _decide(review, defaults)
        payload = encode_response(review.uid, decision)
        record(decision.result, perf_counter() - started)
        if decision.code != 200:
            _log_refusal(review, decision)
        return web.Response(body=payload, content_type="application/json")

    return mutate


def _decide(review: Review, defaults: Defaults) -> Decision:
    try:
        return decide(review, defaults)
    except Exception:
        # A bug must not take the server down with it; the apiserver applies failurePolicy.
        log.exception("deciding admission %s failed", review.uid)
        return Decision("error", message="internal error in the module webhook; see its log", code=500)


def _bad_request(request: web.Request, field: str, reason: str) -> web.Response:
    metrics = request.app[METRICS]
    metrics.bad_requests.labels(field).inc()
    metrics.stats.results["error"] += 1
    log.warning("bad admission request from %s: %s", request.remote, reason)
    return web.Response(status=400, text=reason + "\n")


def _log_refusal(review: Review, decision: Decision) -> None:
    req = review.request
    try:
        obj: Any = review.object()
    except Unreadable:
        obj = None
    metadata = obj.get("metadata") if isinstance(obj, dict) else None
    name = req.get("name") or (metadata.get("generateName") if isinstance(metadata, dict) else None) or "?"
    log.info(
        "%s %s pod %s/%s (uid %s): %s",
        decision.result,
        req.get("operation"),
        req.get("namespace"),
        name,
        review.uid,
        decision.message,
    )
