"""A broker that wants credentials or TLS: the provider and base-sim connect with the flags a user
passes; a wrong password or an untrusted broker certificate is reported naming the flag to fix,
and the process keeps retrying (and recovers once the broker accepts it) instead of exiting."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from certs import pki
from devcluster.broker import Broker, _passwd_tool, find_mosquitto
from devcluster.cluster import ControlPlane
from tests.e2e.provider.conftest import System, http_status
from tests.e2e.provider.modules import pods, running_ready, sample_deployment
from tests.helpers import wait_until

pytestmark = pytest.mark.controlplane

MakeSystem = Callable[[Broker], System]


@pytest.fixture
def password_broker(tmp_path: Path) -> Iterator[Broker]:
    with Broker(identity=False, users={"provider": "provider-secret", "bases": "bases-secret"}, workdir=tmp_path / "mqtt") as broker:
        yield broker


@pytest.fixture
def broker_ca(tmp_path: Path) -> Path:
    ca = pki.new_ca("test-mqtt-ca", days=2)
    ca_file = tmp_path / "mqtt-ca.crt"
    pki.write_file(ca_file, ca.cert_pem)
    serving = pki.issue(ca, "mqtt-broker", dns_names=["localhost"], ips=["127.0.0.1"], days=2)
    serving.write(tmp_path / "mqtt.crt", tmp_path / "mqtt.key")
    return ca_file


@pytest.fixture
def tls_broker(tmp_path: Path, broker_ca: Path) -> Iterator[Broker]:
    with Broker(identity=False, workdir=tmp_path / "mqtt-tls", tls_cert=tmp_path / "mqtt.crt", tls_key=tmp_path / "mqtt.key") as broker:
        yield broker


@pytest.fixture
def make_system(control_plane: ControlPlane, tmp_path: Path) -> Iterator[MakeSystem]:
    made: list[System] = []

    def make(broker: Broker) -> System:
        s = System(control_plane, broker, tmp_path)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()


def log_count(path: Path, text: str) -> int:
    return path.read_text(errors="replace").count(text) if path.exists() else 0


def module_runs(system: System, namespace: str) -> None:
    system.cp.kubectl("apply", "-f", "-", input=sample_deployment(namespace))
    wait_until(lambda: [p for p in pods(system, namespace) if running_ready(p)], 90, what="module Pod Running+Ready")


def test_password_broker_carries_the_module_flow(make_system: MakeSystem, password_broker: Broker, tmp_path: Path,
                                                 namespace: str) -> None:
    system = make_system(password_broker)
    secret = tmp_path / "provider-password"
    secret.write_text("provider-secret\n")
    system.start_provider("--mqtt-username", "provider", "--mqtt-password-file", str(secret))
    sim = system.start_sim("--mqtt-username", "bases", count=2, env={"MQTT_PASSWORD": "bases-secret"})
    system.wait_nodes_ready(2)
    module_runs(system, namespace)
    assert sum(len(b["modules"]) for b in sim.bases().values()) == 1


def test_wrong_password_is_named_and_retried_until_the_broker_accepts(make_system: MakeSystem, password_broker: Broker,
                                                                     tmp_path: Path) -> None:
    system = make_system(password_broker)
    secret = tmp_path / "provider-password"
    secret.write_text("not-the-password\n")
    provider = system.start_provider("--mqtt-username", "provider", "--mqtt-password-file", str(secret),
                                     wait_ready=False)
    log = provider.log_path
    # Refused, told why and what to fix, and tried again: the process is alive, live, not ready.
    wait_until(lambda: log_count(log, "--mqtt-password-file") >= 2, 60, what="two refusals naming the flag")
    text = log.read_text()
    assert "refused client" in text and "'provider'" in text
    assert provider.running()
    assert http_status(system.provider_port, "/healthz") == 200
    assert http_status(system.provider_port, "/readyz") != 200

    # The operator fixes the broker side (the password the provider has is now the right one):
    # the running provider gets in on its next retry, without a restart.
    passwd = password_broker.workdir / "passwd"
    passwd.write_text("provider:not-the-password\nbases:bases-secret\n")
    subprocess.run([_passwd_tool(find_mosquitto()), "-U", str(passwd)], check=True, capture_output=True)
    assert password_broker.process.pid is not None
    os.kill(password_broker.process.pid, signal.SIGHUP)
    wait_until(lambda: http_status(system.provider_port, "/readyz") == 200, 60, what="provider ready after the fix")
    system.start_sim("--mqtt-username", "bases", count=1, env={"MQTT_PASSWORD": "bases-secret"})
    system.wait_nodes_ready(1)


def test_base_sim_without_credentials_is_told_which_flags(make_system: MakeSystem, password_broker: Broker) -> None:
    system = make_system(password_broker)
    system.start_provider("--mqtt-username", "provider", wait_ready=False, env={"MQTT_PASSWORD": "provider-secret"})
    with pytest.raises(Exception, match="not ready"):
        system.start_sim(count=1)  # its /readyz stays 503: the broker wants credentials
    sim_log = system.processes[-1].log_path
    assert log_count(sim_log, "set --mqtt-username and --mqtt-password-file") >= 1
    assert system.processes[-1].running()


def test_tls_broker_verified_with_the_ca_flag(make_system: MakeSystem, tls_broker: Broker, broker_ca: Path,
                                              namespace: str) -> None:
    system = make_system(tls_broker)
    system.start_provider("--mqtt-ca", str(broker_ca))
    system.start_sim("--mqtt-ca", str(broker_ca), count=2)
    system.wait_nodes_ready(2)
    module_runs(system, namespace)


def test_tls_broker_with_the_wrong_ca_is_refused_clearly(make_system: MakeSystem, tls_broker: Broker, tmp_path: Path) -> None:
    other = pki.new_ca("someone-else", days=2)
    wrong = tmp_path / "other-ca.crt"
    pki.write_file(wrong, other.cert_pem)
    system = make_system(tls_broker)
    provider = system.start_provider("--mqtt-ca", str(wrong), wait_ready=False)
    wait_until(lambda: log_count(provider.log_path, "TLS certificate not trusted") >= 2, 60,
               what="two TLS refusals")
    text = provider.log_path.read_text()
    assert f"check that --mqtt-ca ({wrong}) holds the CA that signed the broker's certificate" in text
    assert provider.running()
    assert http_status(system.provider_port, "/readyz") != 200
    assert "connected to" not in text


def test_bad_ca_file_is_refused_at_start(make_system: MakeSystem, tls_broker: Broker, tmp_path: Path) -> None:
    junk = tmp_path / "junk.crt"
    junk.write_text("not a certificate\n")
    system = make_system(tls_broker)
    provider = system.start_provider("--mqtt-ca", str(junk), wait_ready=False)
    assert provider.proc is not None
    assert provider.proc.wait(60) == 2
    assert f"--mqtt-ca {junk}: not a PEM CA bundle" in provider.log_path.read_text()
