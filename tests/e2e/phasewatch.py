"""What a user watching with `kubectl get -w` would have seen, recorded for assertions afterwards.

`ApiWatch` lists and then watches one API collection in a background thread (relisting when the
watch expires or drops) and hands every object version to a callback, oldest first per object: a
version not newer than one already seen (a lagging watch event after a relist) is dropped, so
watch events and lists can be mixed without inventing transitions.

- `PhaseWatch`: every Pod's phase sequence in a namespace; `regressions()` names each Pod whose phase
  went backwards (Running -> Pending, Succeeded/Failed -> anything else), which Kubernetes never does.
- `NodeWatch`: every Ready status and NoExecute taint each Node of a selector ever had.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from devcluster.cluster import ControlPlane

ObjectHandler = Callable[[str, dict[str, Any]], None]

#: Server-side watch timeout; the watch is reopened from the last resourceVersion after it.
WATCH_TIMEOUT_S = 240


def admin_ssl_context(cp: ControlPlane) -> ssl.SSLContext:
    """TLS as the control plane's admin (system:masters), trusting its CA."""
    ctx = ssl.create_default_context(cafile=str(cp.pki_dir / "ca.crt"))
    ctx.load_cert_chain(cp.pki_dir / "admin.crt", cp.pki_dir / "admin.key")
    return ctx


def api_request(cp: ControlPlane, method: str, path: str, body: Any = None,
                content_type: str = "application/json", ctx: ssl.SSLContext | None = None) -> tuple[int, Any]:
    """One API request as admin: (HTTP status, decoded JSON body or None)."""
    url = urllib.parse.urlsplit(cp.server)
    conn = http.client.HTTPSConnection(url.hostname or "127.0.0.1", url.port or 443,
                                       context=ctx or admin_ssl_context(cp), timeout=30)
    try:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"} | ({"Content-Type": content_type} if data is not None else {})
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, (json.loads(raw) if raw else None)
    finally:
        conn.close()


def _rv(obj: dict[str, Any]) -> int:
    try:
        return int((obj.get("metadata") or {}).get("resourceVersion") or 0)
    except ValueError:
        return 0


class ApiWatch:
    """List + watch of `path` (e.g. /api/v1/namespaces/x/pods) as the control plane's admin."""

    def __init__(self, cp: ControlPlane, path: str, on_object: ObjectHandler, *, label_selector: str = "",
                 name: str = "watch") -> None:
        self.cp = cp
        self.path = path
        self.label_selector = label_selector
        self.on_object = on_object
        self.name = name
        self._lock = threading.Lock()
        self._seen_rv: dict[str, int] = {}
        self._stop = threading.Event()
        self._listed = threading.Event()
        self._conn: http.client.HTTPSConnection | None = None
        self._thread = threading.Thread(target=self._run, name=f"apiwatch-{name}", daemon=True)
        self.errors: list[str] = []
        url = urllib.parse.urlsplit(cp.server)
        self._host, self._port = url.hostname or "127.0.0.1", url.port or 443
        self._ssl = admin_ssl_context(cp)

    # --- what tests call --------------------------------------------------------------------------------

    def start(self, timeout: float = 30) -> ApiWatch:
        self._thread.start()
        if not self._listed.wait(timeout):
            raise AssertionError(f"{self.name}: no first list of {self.path} after {timeout:.0f}s: {self.errors[-3:]}")
        return self

    def resync(self) -> None:
        """Read the collection now and record it: afterwards the record is at least as new as this
        moment, whatever the watch stream has or has not delivered yet."""
        _, items = self._list()
        for obj in items:
            self._observe("LISTED", obj)

    def stop(self) -> None:
        self._stop.set()
        conn = self._conn
        if conn is not None and conn.sock is not None:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(10)

    # --- the thread ----------------------------------------------------------------------------------------

    def _query(self, **params: str) -> str:
        if self.label_selector:
            params["labelSelector"] = self.label_selector
        return self.path + ("?" + urllib.parse.urlencode(params) if params else "")

    def _list(self) -> tuple[str, list[dict[str, Any]]]:
        conn = http.client.HTTPSConnection(self._host, self._port, context=self._ssl, timeout=30)
        try:
            conn.request("GET", self._query(), headers={"Accept": "application/json"})
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200:
                raise RuntimeError(f"list {self.path}: HTTP {resp.status}: {body[:300]!r}")
            doc = json.loads(body)
            return str(doc["metadata"]["resourceVersion"]), list(doc.get("items") or [])
        finally:
            conn.close()

    def _observe(self, event: str, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        uid = str(meta.get("uid") or meta.get("name"))
        rv = _rv(obj)
        with self._lock:
            if event != "DELETED" and rv and rv <= self._seen_rv.get(uid, 0):
                return  # an older version than one already recorded
            self._seen_rv[uid] = max(rv, self._seen_rv.get(uid, 0))
            self.on_object(event, obj)

    def _run(self) -> None:
        rv = ""
        while not self._stop.is_set():
            try:
                if not rv:
                    rv, items = self._list()
                    for obj in items:
                        self._observe("LISTED", obj)
                    self._listed.set()
                rv = self._watch(rv)
            except Exception as exc:  # a dropped connection: reopen (relist if the watch expired)
                if self._stop.is_set():
                    return
                self.errors.append(repr(exc))
                rv = ""
                self._stop.wait(0.5)

    def _watch(self, rv: str) -> str:
        """Follow the watch from `rv`; returns where to resume ('' = relist)."""
        conn = http.client.HTTPSConnection(self._host, self._port, context=self._ssl, timeout=WATCH_TIMEOUT_S + 30)
        self._conn = conn
        try:
            conn.request("GET", self._query(watch="1", resourceVersion=rv, allowWatchBookmarks="true",
                                            timeoutSeconds=str(WATCH_TIMEOUT_S)))
            resp = conn.getresponse()
            if resp.status != 200:
                raise RuntimeError(f"watch {self.path}: HTTP {resp.status}: {resp.read()[:300]!r}")
            while not self._stop.is_set():
                line = resp.readline()
                if not line:
                    return rv  # the server ended the watch (timeoutSeconds): resume from here
                if not line.strip():
                    continue
                event = json.loads(line)
                obj = event.get("object") or {}
                kind = event.get("type")
                if kind == "ERROR":
                    return ""  # 410 Gone and friends: relist
                rv = str((obj.get("metadata") or {}).get("resourceVersion") or rv)
                if kind != "BOOKMARK":
                    self._observe(str(kind), obj)
            return rv
        finally:
            self._conn = None
            conn.close()


# --- Pod phases ----------------------------------------------------------------------------------------------

#: Pending -> Running -> Succeeded | Failed; the last two are final.
PHASE_RANK = {"Pending": 0, "Running": 1, "Succeeded": 2, "Failed": 2}
FINAL_PHASES = frozenset({"Succeeded", "Failed"})


@dataclass(frozen=True)
class PodSeen:
    """One recorded version of a Pod."""

    at: float
    phase: str
    ready: str
    deleting: bool
    reason: str = ""
    message: str = ""


@dataclass
class PodHistory:
    name: str
    uid: str
    seen: list[PodSeen] = field(default_factory=list)
    deleted: bool = False

    def phases(self) -> list[str]:
        """The phase sequence, repeats collapsed (a Pod without a phase yet is left out)."""
        out: list[str] = []
        for s in self.seen:
            if s.phase and (not out or out[-1] != s.phase):
                out.append(s.phase)
        return out

    def regression(self) -> str | None:
        """The first backwards step, e.g. 'Running -> Pending', or None."""
        phases = self.phases()
        for before, after in itertools.pairwise(phases):
            if before in FINAL_PHASES or PHASE_RANK.get(after, 0) < PHASE_RANK.get(before, 0):
                return f"{before} -> {after}"
        return None

    def describe(self) -> str:
        return " -> ".join(self.phases()) or "(no phase)"


def _ready(pod: dict[str, Any]) -> str:
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready":
            return str(c.get("status"))
    return "Unknown"


class PhaseWatch:
    """Every Pod of a namespace, every version: phase, Ready, being deleted."""

    def __init__(self, cp: ControlPlane, namespace: str) -> None:
        self.namespace = namespace
        self.pods: dict[str, PodHistory] = {}
        self._watch = ApiWatch(cp, f"/api/v1/namespaces/{namespace}/pods", self._on_pod, name=f"pods-{namespace}")

    def start(self) -> PhaseWatch:
        self._watch.start()
        return self

    def stop(self) -> None:
        """Record the namespace as it is now, then stop watching."""
        with contextlib.suppress(Exception):
            self._watch.resync()
        self._watch.stop()

    def resync(self) -> None:
        self._watch.resync()

    def _on_pod(self, event: str, pod: dict[str, Any]) -> None:
        meta = pod.get("metadata") or {}
        uid = str(meta.get("uid"))
        hist = self.pods.setdefault(uid, PodHistory(str(meta.get("name")), uid))
        status = pod.get("status") or {}
        hist.seen.append(PodSeen(time.monotonic(), str(status.get("phase") or ""), _ready(pod),
                                 bool(meta.get("deletionTimestamp")), str(status.get("reason") or ""),
                                 str(status.get("message") or "")))
        if event == "DELETED":
            hist.deleted = True

    # --- questions --------------------------------------------------------------------------------------

    def by_name(self, name: str) -> list[PodHistory]:
        return [h for h in self.pods.values() if h.name == name]

    def history(self, uid: str) -> PodHistory:
        return self.pods[uid]

    def regressions(self) -> list[str]:
        out = []
        for h in self.pods.values():
            step = h.regression()
            if step:
                out.append(f"Pod {self.namespace}/{h.name} (uid {h.uid[:8]}) went {step}: {h.describe()}")
        return out

    def assert_never_regressed(self) -> None:
        bad = self.regressions()
        assert not bad, "Pod phase went backwards (Kubernetes never does this; watchers misread it):\n  " + \
            "\n  ".join(bad)

    def removed(self) -> list[PodHistory]:
        """Pods that were deleted or marked for deletion while watched."""
        return [h for h in self.pods.values() if h.deleted or any(s.deleting for s in h.seen)]

    def not_ready_after_ready(self, uid: str) -> list[PodSeen]:
        """Versions of the Pod that were not Running+Ready after its first Running+Ready one."""
        seen = self.pods[uid].seen
        first = next((i for i, s in enumerate(seen) if s.phase == "Running" and s.ready == "True"), None)
        if first is None:
            return []
        return [s for s in seen[first:] if not (s.phase == "Running" and s.ready == "True")]


# --- Nodes ----------------------------------------------------------------------------------------------------


@dataclass
class NodeHistory:
    name: str
    ready: list[str] = field(default_factory=list)
    #: Every NoExecute taint key the Node had at some point.
    no_execute: set[str] = field(default_factory=set)

    def statuses(self) -> list[str]:
        out: list[str] = []
        for r in self.ready:
            if not out or out[-1] != r:
                out.append(r)
        return out


class NodeWatch:
    """Every Ready status and NoExecute taint of the Nodes matching `label_selector`."""

    def __init__(self, cp: ControlPlane, label_selector: str) -> None:
        self.nodes: dict[str, NodeHistory] = {}
        self._stopped = False
        self._watch = ApiWatch(cp, "/api/v1/nodes", self._on_node, label_selector=label_selector, name="nodes")

    def start(self) -> NodeWatch:
        self._watch.start()
        return self

    def stop(self) -> None:
        """Record the Nodes as they are now, then stop watching (again: no-op)."""
        if self._stopped:
            return
        self._stopped = True
        with contextlib.suppress(Exception):
            self._watch.resync()
        self._watch.stop()

    def _on_node(self, event: str, node: dict[str, Any]) -> None:
        name = str((node.get("metadata") or {}).get("name"))
        hist = self.nodes.setdefault(name, NodeHistory(name))
        if event == "DELETED":
            return
        hist.ready.append(_ready(node))
        for t in (node.get("spec") or {}).get("taints") or []:
            if t.get("effect") == "NoExecute":
                hist.no_execute.add(str(t.get("key")))

    def not_ready(self) -> dict[str, list[str]]:
        """Nodes that were ever seen other than Ready=True, with their Ready sequence."""
        return {n: h.statuses() for n, h in self.nodes.items() if any(r != "True" for r in h.ready)}

    def no_execute_taints(self, ignore: frozenset[str] = frozenset()) -> dict[str, set[str]]:
        return {n: h.no_execute - ignore for n, h in self.nodes.items() if h.no_execute - ignore}
