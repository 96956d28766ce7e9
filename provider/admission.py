"""Which bases may become virtual Nodes: the provider's own check of every heartbeat (defence in
depth behind the broker's ACLs; README "Provider-side base admission").

A heartbeat is network input: anyone who can publish on the broker can claim any base ID, name and
cluster. A base becomes (or stays) a Node only when

- its ID is a lower-case DNS name (subdomain) of at most `MAX_BASE_ID_LENGTH` characters, so
  `virtual-node-<id>` is the Node name, its Lease name and its `kubernetes.io/hostname` label, one
  ID to one Node (always);
- it fully matches `--base-id-pattern`, by default `DEFAULT_BASE_ID_PATTERN`: a DNS label or an IPv4
  address, which arklet's default IDs (an IPv4 address, `unknown-xxxxx`) and older runtimes' random
  UUIDs are;
- its `baseMetadata.name` / `clusterName` are in `--allowed-base-names` / `--allowed-cluster-names`,
  when those are given (a heartbeat without them has "" there).

A base failing these is refused: one log line, one Event and one count the first time its ID is
refused for a reason (a bounded memory of refused IDs, so a flood of IDs cannot grow it), and no
retry: its later heartbeats are dropped and counted in the MQTT rejections. Separately, at most
`--new-bases-per-minute` bases new to this provider are admitted in any minute; one over the limit
is not refused, only not admitted yet, and its next heartbeat (every 10 s) tries again.

Everything from a base that reaches a log or an Event goes through `shown()`: escaped and cut.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import Counter

from koupleless import arklet, keys

log = logging.getLogger(__name__)

BASES_REFUSED = Counter(
    "koupleless_provider_bases_refused_total",
    "Base IDs refused as Nodes, once per ID and reason (invalid_id, id_pattern, base_name, cluster_name)",
    ["reason"],
)
BASES_THROTTLED = Counter(
    "koupleless_provider_bases_throttled_total",
    "Heartbeats of new bases not admitted yet: over --new-bases-per-minute (they try again on their next one)",
)
BASES_ADMITTED = Counter("koupleless_provider_bases_admitted_total", "New bases admitted as Nodes")

#: `virtual-node-` (13) + 50 = 63: the Node name is also a valid label value (kubernetes.io/hostname)
#: and DNS label length; an IPv4 address is at most 15 characters, a UUID 36.
MAX_BASE_ID_LENGTH = 63 - len(keys.VNODE_NAME_PREFIX)
#: A DNS-1123 subdomain (dot-separated labels of [a-z0-9-], each starting and ending alphanumeric):
#: what a Node name must be. Always enforced.
BASE_ID_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
#: Which of those are taken without --base-id-pattern: a DNS label (no dots: a UUID, `unknown-xxxxx`,
#: a host or Pod name) or an IPv4 address (arklet's default identity). A dotted name such as
#: `evil.base` is refused unless the operator's pattern accepts it.
DEFAULT_BASE_ID_PATTERN = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?|[0-9]{1,3}(\.[0-9]{1,3}){3}"
#: Refused (ID, reason) pairs remembered so each is reported once; the oldest are forgotten first.
REFUSED_MEMORY = 10_000
#: Refusals reported one by one (log line and Event) per minute; beyond it, one summary a minute.
REFUSAL_REPORTS_PER_MINUTE = 20
DEFAULT_NEW_BASES_PER_MINUTE = 1000
SUMMARY_PERIOD_S = 60.0
#: How much of a base's input a log line or Event shows.
SHOWN_CHARS = 80


def shown(value: str) -> str:
    """A value from the network as it may appear in a log line or Event: escaped (no control or
    bidirectional characters reach a terminal) and cut to SHOWN_CHARS."""
    if len(value) > SHOWN_CHARS:
        return ascii(value[:SHOWN_CHARS]) + f"...({len(value)} chars)"
    return ascii(value)


def base_id_problem(base_id: str) -> str | None:
    """Why `base_id` cannot name a Node one-to-one, or None when it can."""
    if len(base_id) > MAX_BASE_ID_LENGTH:
        return f"is {len(base_id)} characters, over the {MAX_BASE_ID_LENGTH} that keep virtual-node-<id> a valid label"
    if not BASE_ID_RE.fullmatch(base_id):
        return ("is not a lower-case DNS name (letters a-z, digits, '-' and '.', each dot-separated part starting "
                "and ending with a letter or digit)")
    return None


def parse_name_list(text: str) -> frozenset[str]:
    return frozenset(n.strip() for n in text.split(",") if n.strip())


@dataclass(frozen=True)
class AdmissionOptions:
    #: Base IDs must fully match it (on top of BASE_ID_RE); None: DEFAULT_BASE_ID_PATTERN.
    base_id_pattern: str | None = None
    #: When non-empty, `baseMetadata.name` must be one of these.
    allowed_base_names: frozenset[str] = frozenset()
    #: When non-empty, `baseMetadata.clusterName` must be one of these.
    allowed_cluster_names: frozenset[str] = frozenset()
    #: New bases admitted in any 60 s; 0: no limit.
    new_bases_per_minute: int = DEFAULT_NEW_BASES_PER_MINUTE
    #: Compiled once; set from base_id_pattern.
    compiled_pattern: re.Pattern[str] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.compiled_pattern is None:
            object.__setattr__(self, "compiled_pattern", re.compile(self.base_id_pattern or DEFAULT_BASE_ID_PATTERN))


class EventSink(Protocol):
    def event(self, obj: dict[str, Any], type_: str, reason: str, message: str, *, kind: str | None = None,
              api_version: str | None = None) -> None: ...


def provider_object() -> dict[str, Any]:
    """What refusal Events are about: the provider's own Pod when it runs in one (POD_NAME and
    POD_NAMESPACE from the downward API), else the `default` Namespace, where Events of
    cluster-wide objects go."""
    name, namespace = os.environ.get(keys.ENV_POD_NAME), os.environ.get(keys.ENV_POD_NAMESPACE)
    if name and namespace:
        return {"kind": "Pod", "apiVersion": "v1", "metadata": {"name": name, "namespace": namespace}}
    return {"kind": "Namespace", "apiVersion": "v1", "metadata": {"name": "default"}}


class BaseAdmission:
    def __init__(self, opts: AdmissionOptions, env: str, events: EventSink | None = None,
                 node_exists: Callable[[str], bool] = lambda _name: False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.opts = opts
        self.env = env
        self.events = events
        self.node_exists = node_exists
        self.clock = clock
        self._refused: collections.OrderedDict[tuple[str, str], None] = collections.OrderedDict()
        #: When the last `new_bases_per_minute` new bases were admitted (a sliding one-minute window).
        self._admitted_at: collections.deque[float] = collections.deque()
        self._reports: collections.deque[float] = collections.deque()
        self._unreported: collections.Counter[str] = collections.Counter()
        self._throttled = 0
        self._throttle_reported_at: float | None = None
        self._summarised_at = clock()

    # --- the checks ---------------------------------------------------------------------------------

    def refusal(self, base_id: str, hb: arklet.Heartbeat) -> tuple[str, str] | None:
        """(reason, why) when this heartbeat's base may not be a Node; None when it may."""
        problem = base_id_problem(base_id)
        if problem:
            return "invalid_id", f"base ID {problem}"
        pattern = self.opts.compiled_pattern
        if pattern is not None and not pattern.fullmatch(base_id):
            if self.opts.base_id_pattern:
                return "id_pattern", f"base ID does not match --base-id-pattern {self.opts.base_id_pattern!r}"
            return "id_pattern", "base ID is neither an IPv4 address nor a DNS label without dots"
        meta = hb.metadata
        if self.opts.allowed_base_names and meta.name not in self.opts.allowed_base_names:
            return "base_name", (f"baseMetadata.name {shown(meta.name)} is not in --allowed-base-names "
                                 f"{','.join(sorted(self.opts.allowed_base_names))}")
        if self.opts.allowed_cluster_names and meta.cluster_name not in self.opts.allowed_cluster_names:
            return "cluster_name", (f"baseMetadata.clusterName {shown(meta.cluster_name)} is not in "
                                    f"--allowed-cluster-names {','.join(sorted(self.opts.allowed_cluster_names))}")
        return None

    def admit(self, base_id: str, hb: arklet.Heartbeat, *, known: bool) -> str | None:
        """None when this heartbeat may count: for a base this provider knows, that it still passes
        the checks; for a new one, also that the minute's budget of new bases is not spent. Else
        why not, as a metric label: `base_refused` or `new_base_throttled`."""
        refused = self.refusal(base_id, hb)
        if refused is not None:
            self._report_refusal(base_id, *refused)
            return "base_refused"
        if known:
            return None
        if self.node_exists(keys.VNODE_NAME_PREFIX + base_id):
            # Its Node is there already (another replica made it, or this one before a restart): not
            # a new Node, so not limited; a standby must be able to take over a whole fleet at once.
            return None
        if not self._take_new_base_slot():
            self._throttled += 1
            BASES_THROTTLED.inc()
            if self._throttle_reported_at is None:
                self._throttle_reported_at = self.clock()
                log.warning("more than %d new bases in a minute (--new-bases-per-minute): base %s and any "
                            "further new ones wait for a later heartbeat; a summary follows each minute",
                            self.opts.new_bases_per_minute, shown(base_id))
            return "new_base_throttled"
        BASES_ADMITTED.inc()
        return None

    def _take_new_base_slot(self) -> bool:
        limit = self.opts.new_bases_per_minute
        if limit <= 0:
            return True
        now = self.clock()
        window = self._admitted_at
        while window and now - window[0] >= 60.0:
            window.popleft()
        if len(window) >= limit:
            return False
        window.append(now)
        return True

    # --- reporting ----------------------------------------------------------------------------------

    def _report_refusal(self, base_id: str, reason: str, why: str) -> None:
        key = (base_id, reason)
        if key in self._refused:
            self._refused.move_to_end(key)
            return
        self._refused[key] = None
        if len(self._refused) > REFUSED_MEMORY:
            self._refused.popitem(last=False)
        BASES_REFUSED.labels(reason).inc()
        now = self.clock()
        while self._reports and now - self._reports[0] >= 60.0:
            self._reports.popleft()
        if len(self._reports) >= REFUSAL_REPORTS_PER_MINUTE:
            self._unreported[reason] += 1  # a flood: summarised once a minute by tick()
            return
        self._reports.append(now)
        topic = arklet.topic_prefix(self.env)
        fix = FIXES[reason]
        log.warning("refused base %s on %s/: %s; it gets no Node and its heartbeats are ignored (%s)",
                    shown(base_id), topic, why, fix)
        if self.events is not None:
            self.events.event(provider_object(), "Warning", "BaseRefused",
                              f"base {shown(base_id)} on {topic}/ refused: {why} ({fix})")

    def tick(self) -> None:
        """Called about once a second: the one-a-minute summaries of what was not reported singly."""
        now = self.clock()
        if now - self._summarised_at < SUMMARY_PERIOD_S:
            return
        self._summarised_at = now
        if self._unreported:
            counts = ", ".join(f"{n} {r}" for r, n in sorted(self._unreported.items()))
            log.warning("refused %d more base IDs in the last minute without a line each (%s); see "
                        "koupleless_provider_bases_refused_total", sum(self._unreported.values()), counts)
            self._unreported.clear()
        if self._throttled:
            log.warning("%d heartbeats of new bases not admitted in the last minute: over "
                        "--new-bases-per-minute %d; each tries again on its next heartbeat",
                        self._throttled, self.opts.new_bases_per_minute)
            self._throttled = 0
        elif self._throttle_reported_at is not None and now - self._throttle_reported_at >= SUMMARY_PERIOD_S:
            self._throttle_reported_at = None  # a quiet minute: the next throttle is logged at once


FIXES = {
    "invalid_id": "give the base a lower-case DNS name as its identity, e.g. its IPv4 address",
    "id_pattern": "give the base an ID that matches, or set --base-id-pattern to one that accepts it",
    "base_name": "add the name to --allowed-base-names if this base is yours",
    "cluster_name": "add the cluster name to --allowed-cluster-names if this base is yours",
}
