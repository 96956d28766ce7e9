"""Certificate files replaced on disk are served by the running webhook within seconds, and no
admission fails meanwhile."""

from __future__ import annotations

import json
import threading
import urllib.request

import orjson
import pytest
from cryptography import x509

from devcluster.cluster import ControlPlane
from tests.e2e.webhook.conftest import RunningWebhook
from tests.helpers import wait_until
from tests.unit.webhook.samples import review, seed_pod

pytestmark = pytest.mark.controlplane


class Traffic:
    """Admissions on two paths until stopped: through the apiserver (server-side dry run, its own
    kept-alive connection) and straight to /mutate on a new TLS connection each time."""

    def __init__(self, cp: ControlPlane, hook: RunningWebhook, namespace: str) -> None:
        self.cp, self.hook, self.namespace = cp, hook, namespace
        self.ok = {"apiserver": 0, "direct": 0}
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._via_apiserver), threading.Thread(target=self._direct)]

    def __enter__(self) -> Traffic:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)

    def _via_apiserver(self) -> None:
        pod = json.dumps(seed_pod("rotation"))
        while not self.stop.is_set():
            proc = self.cp.kubectl(
                "apply", "--dry-run=server", "-n", self.namespace, "-f", "-", input=pod, check=False
            )
            if proc.returncode == 0:
                self.ok["apiserver"] += 1
            else:
                self.failures.append(f"apiserver: {proc.stderr.strip()}")

    def _direct(self) -> None:
        body = orjson.dumps(review(seed_pod()))
        while not self.stop.is_set():
            request = urllib.request.Request(
                self.hook.url + "/mutate", data=body, headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(request, context=self.hook.ssl_context(), timeout=5) as resp:
                    assert orjson.loads(resp.read())["response"]["allowed"] is True
                self.ok["direct"] += 1
            except Exception as exc:
                self.failures.append(f"direct: {exc!r}")


def test_rotated_certificate_is_served_with_no_failed_request(
    control_plane: ControlPlane, webhook_namespace: str, webhook: RunningWebhook
) -> None:
    old_serial = webhook.served_serial()
    with Traffic(control_plane, webhook, webhook_namespace) as traffic:
        wait_until(lambda: min(traffic.ok.values()) >= 3, timeout=30, what="admissions flowing on both paths")
        webhook.rotate_certs()
        new_serial = x509.load_pem_x509_certificate((webhook.cert_dir / "tls.crt").read_bytes()).serial_number
        assert new_serial != old_serial
        wait_until(
            lambda: webhook.served_serial() == new_serial, timeout=10, what="the new certificate served"
        )
        after = dict(traffic.ok)
        wait_until(
            lambda: all(traffic.ok[k] >= after[k] + 3 for k in after),
            timeout=30,
            what="admissions after the rotation",
        )
    assert traffic.failures == []
