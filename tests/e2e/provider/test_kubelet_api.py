"""`kubectl logs` and `kubectl exec` on a module Pod, through the real kube-apiserver: it dials the
virtual Node's Hostname address and kubelet port (the provider's kubelet API), with its kubelet
client certificate, and verifies the provider's serving certificate (--kubelet-certificate-authority).
The provider runs with exactly the manifest's RBAC (events list, pods get, SubjectAccessReviews)."""

from __future__ import annotations

import re
import ssl
import urllib.error
import urllib.request

import pytest

from tests.e2e.provider.conftest import System, manifest_rbac_kubeconfig
from tests.e2e.provider.modules import URL_V1, base_of, pods, running_ready, sample_deployment
from tests.helpers import wait_until

pytestmark = pytest.mark.controlplane

STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


def test_kubectl_logs_and_exec_on_a_module_pod(system: System, namespace: str) -> None:
    cp = system.cp
    kubeconfig = manifest_rbac_kubeconfig(cp)
    system.start_provider("--kubeconfig", str(kubeconfig))
    sim = system.start_sim(count=1)
    [node] = system.wait_nodes_ready(1)
    addresses = {a["type"]: a["address"] for a in node["status"]["addresses"]}
    [base] = sim.bases().values()
    assert addresses == {"InternalIP": base["ip"], "Hostname": "127.0.0.1"}
    port = node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"]
    assert port > 0

    cp.kubectl("apply", "-f", "-", input=sample_deployment(namespace))
    wait_until(lambda: [p for p in pods(system, namespace) if running_ready(p)], 60, what="module Pod Ready")
    [pod] = pods(system, namespace)
    name, base_id = pod["metadata"]["name"], base_of(pod)
    started = pod["status"]["containerStatuses"][0]["state"]["running"]["startedAt"]

    # The Events are written just after the status: wait for the second one.
    def logged() -> list[str] | None:
        out = cp.kubectl("logs", name, "-n", namespace).stdout.splitlines()
        return out if any(" Installed: " in line for line in out) else None

    lines = wait_until(logged, 30, what="kubectl logs showing Installed")
    assert all(re.match(STAMP + " ", line) for line in lines), lines
    texts = [line.split(" ", 1)[1] for line in lines]
    assert texts[:2] == [
        f"Installing: Installing module biz1:0.0.1-SNAPSHOT from {URL_V1} on base {base_id}",
        f"Installed: Installed module biz1:0.0.1-SNAPSHOT on base {base_id}",
    ]
    assert re.fullmatch(rf"base {base_id} reports biz1:0\.0\.1-SNAPSHOT ACTIVATED since {STAMP}( \(.*\))?", texts[2])
    assert texts[3:] == [f"status: running since {started} (Ready)"]
    # kubelet's query parameters, as kubectl sends them.
    assert cp.kubectl("logs", name, "-n", namespace, "--tail=1").stdout.split(" ", 1)[1] == \
        f"status: running since {started} (Ready)\n"
    stamped = cp.kubectl("logs", name, "-n", namespace, "--timestamps").stdout.splitlines()
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z Installing: ", stamped[0]), stamped[0]

    proc = cp.kubectl("exec", name, "-n", namespace, "--", "ls", check=False)
    sentence = (f"module biz1 of Pod {namespace}/{name} runs inside the JVM of base {base_id} "
                f"(Node virtual-node-{base_id}, {base['ip']}): there is no container to exec into or attach to; "
                "use the base's own tools (arthas, its logs) instead")
    assert proc.returncode != 0
    assert proc.stderr.strip() == f"error: Internal error occurred: unable to upgrade connection: {sentence}"

    # Only kube-apiserver's kind of client gets in: no client certificate is 401 (kubelet's x509
    # authentication); the cluster CA's admin certificate passes it and the SubjectAccessReview.
    url = f"https://127.0.0.1:{port}/containerLogs/{namespace}/{name}/biz1?tailLines=1"
    ctx = ssl.create_default_context(cafile=str(cp.pki_dir / "ca.crt"))
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, context=ctx, timeout=5)
    assert refused.value.code == 401
    ctx.load_cert_chain(cp.pki_dir / "admin.crt", cp.pki_dir / "admin.key")
    with urllib.request.urlopen(url, context=ctx, timeout=5) as resp:
        assert resp.read().decode().endswith(f"status: running since {started} (Ready)\n")

    log = (system.workdir / "provider.log").read_text()
    assert "Forbidden" not in log, "the provider asked for something RBAC does not grant"
