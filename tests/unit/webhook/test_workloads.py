"""Module workloads: the selector is aligned with the Pod template, so the seed's sample is accepted."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonpatch
import yaml

from webhook.workloads import align_selector

SAMPLE = Path(__file__).resolve().parents[3] / "manifests" / "samples" / "module-deployment.yaml"


def seed_deployment() -> dict[str, Any]:
    return dict(yaml.safe_load(SAMPLE.read_text()))


def _apply(obj: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    return dict(jsonpatch.apply_patch(copy.deepcopy(obj), ops))


def test_seed_sample_selector_is_aligned_with_its_template() -> None:
    deployment = seed_deployment()
    ops, warnings = align_selector(deployment)
    fixed = _apply(deployment, ops)
    template_labels = fixed["spec"]["template"]["metadata"]["labels"]
    assert all(template_labels.get(k) == v for k, v in fixed["spec"]["selector"]["matchLabels"].items())
    assert fixed["spec"]["selector"]["matchLabels"] == {"app": "test-module-deployment-non-peer"}
    assert template_labels == deployment["spec"]["template"]["metadata"]["labels"], "template untouched"
    (warning,) = warnings
    assert warning.startswith("spec.selector.matchLabels.app:")
    assert "test-module-deployment-non-peer" in warning


def test_missing_template_label_is_added() -> None:
    deployment = seed_deployment()
    deployment["spec"]["selector"]["matchLabels"] = {"tier": "modules"}
    ops, warnings = align_selector(deployment)
    fixed = _apply(deployment, ops)
    assert fixed["spec"]["template"]["metadata"]["labels"]["tier"] == "modules"
    assert len(warnings) == 1


def test_matching_or_non_module_or_expression_selectors_are_left_alone() -> None:
    matching = seed_deployment()
    matching["spec"]["selector"]["matchLabels"] = {"app": "test-module-deployment-non-peer"}
    assert align_selector(matching) == ([], [])

    plain = seed_deployment()
    del plain["spec"]["template"]["metadata"]["labels"]["module-controller.koupleless.io/component"]
    assert align_selector(plain) == ([], [])

    expressions = seed_deployment()
    expressions["spec"]["selector"]["matchExpressions"] = [{"key": "app", "operator": "Exists"}]
    assert align_selector(expressions) == ([], [])


def test_odd_shapes_never_raise() -> None:
    for obj in ({}, {"spec": None}, {"spec": {"template": []}}, {"spec": {"selector": "x", "template": {
            "metadata": {"labels": {"module-controller.koupleless.io/component": "module"}}}}}):
        assert align_selector(obj) == ([], [])
