"""The scheduler registration the manifests ship is the one extender/config.py builds."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from extender.config import MODULE_SCHEDULER_NAME, extender_entry, module_profile, scheduler_configuration
from koupleless import keys

MANIFESTS = Path(__file__).resolve().parents[3] / "manifests" / "scheduler"
URL = "http://module-controller-extender.module-controller.svc:8888"


def test_cluster_scheduler_manifest_matches_the_builder() -> None:
    shipped = yaml.safe_load((MANIFESTS / "kube-scheduler-config.yaml").read_text())
    assert shipped == scheduler_configuration(URL, kubeconfig="/etc/kubernetes/scheduler.conf")


def test_second_scheduler_manifest_matches_the_builder() -> None:
    shipped = yaml.safe_load((MANIFESTS / "second-scheduler" / "kube-scheduler-config.yaml").read_text())
    assert shipped == scheduler_configuration(URL, default_profile=False, lock_namespace="module-controller")
    kustomization = yaml.safe_load((MANIFESTS / "second-scheduler" / "kustomization.yaml").read_text())
    assert kustomization["configMapGenerator"][0]["files"] == ["kube-scheduler-config.yaml"]


def test_entry_only_calls_the_extender_for_module_pods_and_never_skips_it() -> None:
    entry = extender_entry("http://127.0.0.1:8888/")
    assert entry["urlPrefix"] == "http://127.0.0.1:8888"
    assert entry["managedResources"] == [{"name": keys.RESOURCE_MODULE, "ignoredByScheduler": True}]
    assert entry["ignorable"] is False and entry["nodeCacheCapable"] is True
    full = extender_entry("http://x", node_cache_capable=False)
    assert full["nodeCacheCapable"] is False and "bindVerb" not in full
    # One call per Pod: the filter passes one base, counted there, so there is nothing left to score
    # and kube-scheduler binds it itself.
    assert "prioritizeVerb" not in entry and "weight" not in entry and "bindVerb" not in entry
    assert extender_entry("http://x", bind=True)["bindVerb"] == "bind"


def test_https_entry_needs_a_ca() -> None:
    with pytest.raises(ValueError, match="CA"):
        extender_entry("https://ext:8888")
    entry = extender_entry("https://ext:8888", ca_pem=b"-----BEGIN CERTIFICATE-----\n", server_name="ext")
    assert entry["enableHTTPS"] is True and entry["tlsConfig"]["serverName"] == "ext"
    assert entry["tlsConfig"]["caData"].startswith("LS0t")


def test_module_profile_leaves_node_selection_to_the_extender() -> None:
    profile = module_profile()
    assert profile["schedulerName"] == MODULE_SCHEDULER_NAME
    assert profile["plugins"]["filter"]["disabled"] == [{"name": "NodeAffinity"}]
    assert profile["percentageOfNodesToScore"] == 100
