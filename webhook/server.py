"""The webhook's aiohttp application: POST /mutate, plus /healthz, /readyz and /metrics.

A body that is not an AdmissionReview with a uid cannot be answered in kind, so it gets HTTP 400
and a plain-text reason; anything with a uid gets a well-formed AdmissionReview back, whatever
else is wrong with it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    gc_collector,
    platform_collector,
    process_collector,
)

from koupleless.http import add_health_routes
from webhook.admission import BadReview, Decision, Review, decide, parse_review, response_document
from webhook.defaults import Defaults

log = logging.getLogger(__name__)

#: The apiserver never sends more than this (controller-runtime's cap too); aiohttp answers 413 above it.
MAX_BODY_BYTES = 7 * 1024 * 1024
MUTATE_PATH = "/mutate"


class WebhookMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.admissions = Counter(
            "koupleless_webhook_admissions",
            "AdmissionReviews answered, by result: allowed (untouched), patched, denied, error (malformed request)",
            ["result"],
            registry=registry,
        )
        self.latency = Histogram(
            "koupleless_webhook_admission_duration_seconds",
            "Time from request received to response body ready",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=registry,
        )
        self.bad_requests = Counter(
            "koupleless_webhook_bad_requests",
            "Bodies answered with HTTP 400 because they are not an AdmissionReview, by the field at fault",
            ["field"],
            registry=registry,
        )
        #: children looked up once: `labels()` takes a lock and hashes on every call
        self.by_result = {r: self.admissions.labels(r) for r in ("allowed", "patched", "denied", "error")}


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
    by_result = metrics.by_result
    observe = metrics.latency.observe
    perf_counter = time.perf_counter
    loads, dumps = orjson.loads, orjson.dumps

    async def mutate(request: web.Request) -> web.Response:
        started = perf_counter()
        body = await request.read()
        try:
            review = parse_review(loads(body))
        except orjson.JSONDecodeError as exc:
            return _bad_request(
                request, "body", f"body: is not JSON ({exc}) — send an admission.k8s.io/v1 AdmissionReview"
            )
        except BadReview as exc:
            return _bad_request(request, exc.field, str(exc))
        decision = _decide(review, defaults)
        payload = dumps(response_document(review.uid, decision))
        by_result[decision.result].inc()
        observe(perf_counter() - started)
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
    request.app[METRICS].bad_requests.labels(field).inc()
    request.app[METRICS].by_result["error"].inc()
    log.warning("bad admission request from %s: %s", request.remote, reason)
    return web.Response(status=400, text=reason + "\n")


def _log_refusal(review: Review, decision: Decision) -> None:
    req = review.request
    obj: Any = req.get("object")
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
