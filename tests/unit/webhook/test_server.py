"""The HTTP face of the webhook: /mutate answers, bad bodies get 400, and the server keeps serving."""

from __future__ import annotations

import base64
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from tests.unit.webhook.samples import review, seed_pod, stripped
from webhook.defaults import Defaults
from webhook.server import MAX_BODY_BYTES, create_app


@pytest.fixture
async def client() -> AsyncIterator[TestClient]:
    app = create_app(Defaults(), registry=CollectorRegistry())
    async with TestClient(TestServer(app)) as client:
        yield client


async def metric(client: TestClient, line_prefix: str) -> float:
    text = await (await client.get("/metrics")).text()
    for line in text.splitlines():
        if line.startswith(line_prefix + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{line_prefix} not in /metrics")


async def test_mutate_answers_with_a_patch(client: TestClient) -> None:
    resp = await client.post("/mutate", data=orjson.dumps(review(stripped(seed_pod()), uid="abc")))
    assert resp.status == 200
    assert resp.content_type == "application/json"
    out = orjson.loads(await resp.read())
    assert out["apiVersion"] == "admission.k8s.io/v1"
    assert out["kind"] == "AdmissionReview"
    assert out["response"]["uid"] == "abc"
    assert out["response"]["allowed"] is True
    assert out["response"]["patchType"] == "JSONPatch"
    assert isinstance(orjson.loads(base64.b64decode(out["response"]["patch"])), list)
    assert await metric(client, 'koupleless_webhook_admissions_total{result="patched"}') == 1


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "body: is not JSON"),
        (b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}', "request: is missing"),
        (b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {}}', "request.uid:"),
        (b"[" * 100_000 + b"]" * 100_000, "body: is not JSON (nested too deeply)"),
        (
            b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": "u", '
            b'"operation": "CREATE", "object": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}",
            "body: is not JSON (nested too deeply)",
        ),
    ],
)
async def test_malformed_body_gets_400_with_a_reason_and_serving_goes_on(
    client: TestClient, body: bytes, reason: str
) -> None:
    resp = await client.post("/mutate", data=body)
    assert resp.status == 400
    assert (await resp.text()).startswith(reason)
    assert await metric(client, 'koupleless_webhook_admissions_total{result="error"}') == 1
    again = await client.post("/mutate", data=orjson.dumps(review(seed_pod())))
    assert again.status == 200
    assert orjson.loads(await again.read())["response"]["allowed"] is True


async def test_denials_are_counted(client: TestClient) -> None:
    pod = seed_pod()
    pod["spec"]["containers"][0]["image"] = "nginx"
    resp = await client.post("/mutate", data=orjson.dumps(review(pod)))
    assert orjson.loads(await resp.read())["response"]["allowed"] is False
    assert await metric(client, 'koupleless_webhook_admissions_total{result="denied"}') == 1
    assert await metric(client, "koupleless_webhook_admission_duration_seconds_count") == 1


async def test_oversized_body_is_refused(client: TestClient) -> None:
    resp = await client.post("/mutate", data=b" " * (MAX_BODY_BYTES + 1))
    assert resp.status == 413
    assert (await client.get("/healthz")).status == 200


async def test_health_routes(client: TestClient) -> None:
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status == 200
    assert (await client.get("/mutate")).status == 405


async def test_a_number_no_float_can_hold_is_refused_by_name(client: TestClient) -> None:
    """Parts of a review are decoded only when needed; one that cannot be is still answered in kind."""
    pod = orjson.dumps(seed_pod()).replace(
        b'"tolerations":[', b'"tolerations":[{"tolerationSeconds":1e400},', 1
    )
    body = orjson.dumps(review({})).replace(b'"object":{}', b'"object":' + pod, 1)
    resp = await client.post("/mutate", data=body)
    assert resp.status == 200
    answer = orjson.loads(await resp.read())["response"]
    assert answer["allowed"] is False
    assert answer["status"]["code"] == 400
    assert answer["status"]["message"].startswith("request.object: cannot be read (Number out of range")
    assert (await client.post("/mutate", data=orjson.dumps(review(seed_pod())))).status == 200


async def test_replicas_reuse_the_verdict_kept_from_the_second(client: TestClient) -> None:
    """Pods of one release differ only in what the webhook does not read (names, volumes). The
    first two are judged (a spec seen once is not kept: most never come back); the rest reuse."""

    async def admit(pod: dict[str, Any]) -> dict[str, Any]:
        resp = await client.post("/mutate", data=orjson.dumps(review(pod)))
        return dict(orjson.loads(await resp.read())["response"])

    async def counts() -> tuple[float, float]:
        name = "koupleless_webhook_new_pod_verdicts_total"
        reused = await metric(client, f'{name}{{verdict="reused"}}')
        return reused, await metric(client, f'{name}{{verdict="judged"}}')

    first, second, third = seed_pod(), seed_pod(), seed_pod()
    # a spec no other test sent: verdicts are kept for the whole process
    run = {"name": "RUN", "value": str(uuid.uuid4())}
    for n, pod in enumerate((first, second, third)):
        pod["spec"]["containers"][0]["env"].append(dict(run))
        pod["spec"]["volumes"] = [{"name": f"kube-api-access-{n}aaaa"}]
    reused, judged = await counts()
    assert await admit(first) == await admit(second) == await admit(third)
    assert await counts() == (reused + 1, judged + 2)
    third["spec"]["containers"][0]["env"].append({"name": "JAVA_OPTS", "value": "-Xmx1g"})
    assert (await admit(third))["allowed"] is True
    assert await counts() == (reused + 1, judged + 3)
