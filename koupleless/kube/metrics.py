"""Prometheus series of the kube layer (client, informers, event recorder), registered once per process."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter(
    "koupleless_kube_requests_total",
    "API server requests by verb and HTTP status code (0 = no response).",
    ["verb", "code"],
)
REQUEST_SECONDS = Histogram(
    "koupleless_kube_request_duration_seconds",
    "API server request latency (watches excluded), by verb.",
    ["verb"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
REQUEST_RETRIES = Counter(
    "koupleless_kube_request_retries_total",
    "API server requests retried, by verb and reason (connection, timeout, throttled).",
    ["verb", "reason"],
)

INFORMER_OBJECTS = Gauge("koupleless_informer_objects", "Objects in an informer's store.", ["informer"])
INFORMER_EVENTS = Counter(
    "koupleless_informer_events_total", "Watch events applied to an informer's store, by type.", ["informer", "type"]
)
INFORMER_LISTS = Counter(
    "koupleless_informer_lists_total", "Full lists (initial and relists) done by an informer.", ["informer"]
)
INFORMER_RELISTS_410 = Counter(
    "koupleless_informer_gone_total",
    "Watches that ended with 410 Gone (resourceVersion too old) and forced a relist.",
    ["informer"],
)
INFORMER_WATCH_RESTARTS = Counter(
    "koupleless_informer_watch_restarts_total",
    "Watch reconnects by reason (timeout = normal server-side end; error = failure, with backoff).",
    ["informer", "reason"],
)
INFORMER_HANDLER_ERRORS = Counter(
    "koupleless_informer_handler_errors_total", "Exceptions raised by informer event handlers.", ["informer"]
)

EVENTS_RECORDED = Counter(
    "koupleless_kube_events_total",
    "Kubernetes Events by outcome: created, aggregated (count bumped), failed, dropped (queue full).",
    ["component", "outcome"],
)
