"""How kube-scheduler is told about the extender: the `extenders[]` entry and the module profile of a
KubeSchedulerConfiguration (kubescheduler.config.k8s.io/v1). Used by manifests/scheduler, the dev
flow and the e2e tests, so all three register the extender the same way.

Why a profile of its own: the in-tree NodeAffinity filter runs before any extender, and when no base
has the version a module asks for it rejects every base itself, so the extender is never called and
the Pod's event only says "didn't match Pod's node affinity/selector". Module Pods therefore use a
profile (`schedulerName: koupleless-module-scheduler`, set by the webhook) in which NodeAffinity does
not filter and the extender enforces the Pod's whole node selection, naming the base label that does
not match. Every other Pod keeps `default-scheduler`, untouched, and never calls the extender
(managedResources).
"""

from __future__ import annotations

import base64
from typing import Any

from koupleless import keys

#: `spec.schedulerName` of module Pods: the profile that leaves node selection to the extender.
MODULE_SCHEDULER_NAME = "koupleless-module-scheduler"

FILTER_VERB = "filter"
BIND_VERB = "bind"


def extender_entry(
    url_prefix: str,
    *,
    node_cache_capable: bool = True,
    bind: bool = False,
    http_timeout: str = "5s",
    ignorable: bool = False,
    ca_pem: bytes | None = None,
    ca_file: str | None = None,
    server_name: str | None = None,
) -> dict[str, Any]:
    """One `extenders[]` entry.

    - `node_cache_capable`: send names only (the extender watches Nodes and Pods itself); needs the
      extender to run with a kubeconfig. False sends full Node objects (no kubeconfig needed).
    - no `bindVerb` (unless `bind`): the filter passes one base, the one the strategy
      (spread/binpack) ranks first, and counts the Pod there before it answers, so kube-scheduler
      binds it itself and the next Pod's filter already sees it (a burst never overbooks a base).
      `bind=True` registers the extender's /bind as well (a binding it re-checks; needs
      `pods/binding` create).
    - no `prioritizeVerb`: with one base passed there is nothing left to score, and each Pod costs
      one extender call (/prioritize is still served for configurations that register it).
    - `managedResources` with `ignoredByScheduler`: only Pods requesting `koupleless.io/module`
      (module Pods) call the extender, and the in-tree resource fit leaves the count to it.
    - `ignorable: false`: if the extender is down, module Pods wait instead of landing anywhere.
    - https `url_prefix`: give the CA (`ca_pem` or `ca_file`); without one the scheduler would
      silently skip server verification.
    """
    entry: dict[str, Any] = {
        "urlPrefix": url_prefix.rstrip("/"),
        "filterVerb": FILTER_VERB,
        "nodeCacheCapable": node_cache_capable,
        "httpTimeout": http_timeout,
        "ignorable": ignorable,
        "managedResources": [{"name": keys.RESOURCE_MODULE, "ignoredByScheduler": True}],
    }
    if bind:
        entry["bindVerb"] = BIND_VERB
    if url_prefix.startswith("https://"):
        tls: dict[str, Any] = {}
        if ca_pem is not None:
            tls["caData"] = base64.b64encode(ca_pem).decode()
        elif ca_file is not None:
            tls["caFile"] = ca_file
        else:
            raise ValueError(
                "an https urlPrefix needs the CA that signed the extender's certificate (ca_pem or ca_file); "
                "without it kube-scheduler would not verify the server at all"
            )
        if server_name:
            tls["serverName"] = server_name
        entry["enableHTTPS"] = True
        entry["tlsConfig"] = tls
    return entry


def module_profile(scheduler_name: str = MODULE_SCHEDULER_NAME) -> dict[str, Any]:
    """The profile module Pods are scheduled by: every in-tree plugin except NodeAffinity's filter
    (the extender enforces node selection for module Pods, with reasons); all Nodes are scored,
    because the extender is a hard filter (a sampled subset could all fail it)."""
    return {
        "schedulerName": scheduler_name,
        "percentageOfNodesToScore": 100,
        "plugins": {"filter": {"disabled": [{"name": "NodeAffinity"}]}},
    }


def scheduler_configuration(
    url_prefix: str,
    *,
    kubeconfig: str | None = None,
    leader_elect: bool = True,
    default_profile: bool = True,
    lock_namespace: str = "kube-system",
    **entry_options: Any,
) -> dict[str, Any]:
    """A whole KubeSchedulerConfiguration: the default profile (unchanged) and the module profile,
    with the extender registered. `default_profile=False` makes a second scheduler that only serves
    module Pods (its own lock, so it runs beside the cluster's kube-scheduler)."""
    profiles = [{"schedulerName": "default-scheduler"}] if default_profile else []
    profiles.append(module_profile())
    config: dict[str, Any] = {
        "apiVersion": "kubescheduler.config.k8s.io/v1",
        "kind": "KubeSchedulerConfiguration",
        "leaderElection": {"leaderElect": leader_elect},
        "profiles": profiles,
        "extenders": [extender_entry(url_prefix, **entry_options)],
    }
    if not default_profile:
        config["leaderElection"]["resourceName"] = MODULE_SCHEDULER_NAME
        config["leaderElection"]["resourceNamespace"] = lock_namespace
    if kubeconfig:
        config["clientConnection"] = {"kubeconfig": kubeconfig}
    return config
