"""New Pods judged in parts (webhook.verdicts): the spec outside the containers once per such part,
the containers each time; the Decision must be the one judging the whole Pod gives."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from koupleless import model
from tests.unit.webhook.samples import review, seed_pod
from tests.unit.webhook.test_fuzz import pods, seed_variants
from webhook import verdicts
from webhook.admission import decide, read_review
from webhook.defaults import Defaults
from webhook.verdicts import CACHED_SPEC_BYTES, CACHED_SPECS, SpecVerdict, judge_new_pod

#: Defaults that change every operation outside the containers: the env toleration, shortened
#: eviction tolerations, the scheduler name.
DEFAULTS = (
    Defaults(),
    Defaults(env="parts", env_taint=True, eviction_toleration_seconds=30, scheduler_name="koupleless-scheduler"),
)
any_pods = pods | seed_variants() | seed_variants()


def with_containers(pod: dict[str, Any], containers: Any) -> dict[str, Any]:
    out = copy.deepcopy(pod)
    out["spec"]["containers"] = copy.deepcopy(containers)
    return out


def judged_whole(pod: dict[str, Any], defaults: Defaults) -> verdicts.Decision:
    return judge_new_pod(pod, defaults, model.owned_by_daemonset(pod))


def new_pod(body: bytes, defaults: Defaults) -> verdicts.Decision:
    """The answer as the server makes it: the body read as bytes (webhook.wire), verdicts kept."""
    return decide(read_review(body), defaults)


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pod=any_pods, other=any_pods, defaults=st.sampled_from(DEFAULTS))
def test_a_spec_verdict_gives_the_whole_pods_decision(pod: dict[str, Any], other: dict[str, Any], defaults: Defaults) -> None:
    """For the Pod's own containers and for another Pod's (a new version of the release)."""
    assume(isinstance(pod.get("spec"), dict))
    owned = model.owned_by_daemonset(pod)
    outside = {k: v for k, v in pod["spec"].items() if k != "containers"}
    part = SpecVerdict(outside, defaults, owned)
    other_spec = other.get("spec")
    for containers in (pod["spec"].get("containers"), other_spec.get("containers") if isinstance(other_spec, dict) else None):
        assert part.judge(containers) == judge_new_pod(with_containers(pod, containers), defaults, owned)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pod=any_pods, others=st.lists(any_pods, min_size=1, max_size=3), defaults=st.sampled_from(DEFAULTS))
def test_the_server_answers_pods_judged_in_parts_as_judged_whole(
    pod: dict[str, Any], others: list[dict[str, Any]], defaults: Defaults
) -> None:
    """The first two Pods keep their spec's outside part; the Pods after them, with the containers
    of others, are judged on their containers alone."""
    assume(isinstance(pod.get("spec"), dict) and model.is_module_pod(pod))
    releases = [pod, pod] + [
        with_containers(pod, o["spec"].get("containers") if isinstance(o.get("spec"), dict) else None) for o in others
    ]
    for version in releases:
        assert new_pod(orjson.dumps(review(version)), defaults) == judged_whole(version, defaults)


def release(versions: int) -> list[dict[str, Any]]:
    """The seed's Pod in `versions` versions: a new jar and BIZ_VERSION each, the rest alike."""
    out = []
    for v in range(versions):
        pod = seed_pod()
        container = pod["spec"]["containers"][0]
        container["image"] = container["image"].replace("0.0.1-SNAPSHOT", f"0.0.{v + 2}")
        container["env"] = [{"name": "BIZ_VERSION", "value": f"0.0.{v + 2}"}]
        out.append(pod)
    return out


class CountedSpecVerdict(SpecVerdict):
    made = 0

    def __init__(self, *args: Any) -> None:
        CountedSpecVerdict.made += 1
        super().__init__(*args)


def test_a_release_has_the_spec_outside_its_containers_judged_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its first two versions judge it (a part seen once is not kept); the later ones reuse it."""
    monkeypatch.setattr(verdicts, "SpecVerdict", CountedSpecVerdict)
    monkeypatch.setattr(CountedSpecVerdict, "made", 0)
    defaults = Defaults(env="release-of-six")
    for pod in release(6):
        assert new_pod(orjson.dumps(review(pod)), defaults) == judged_whole(pod, defaults)
    assert CountedSpecVerdict.made == 2


def test_kept_verdicts_and_parts_stay_bounded() -> None:
    defaults = Defaults(env="bounded")
    for n in range(CACHED_SPECS * 2 + 7):
        pod = seed_pod()
        pod["spec"]["nodeName"] = f"virtual-node-{n}"  # a new part outside the containers each time
        body = orjson.dumps(review(pod))
        for _ in range(2):  # kept from the second sighting
            new_pod(body, defaults)
        cache = verdicts._VERDICTS
        assert len(cache.kept) <= CACHED_SPECS
        assert len(cache.parts) <= CACHED_SPECS
        assert len(cache.seen_once) <= CACHED_SPECS
        assert len(cache.parts_seen_once) <= CACHED_SPECS
    assert cache.parts and cache.kept


def test_a_spec_too_big_to_keep_is_judged_each_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verdicts, "SpecVerdict", CountedSpecVerdict)
    monkeypatch.setattr(CountedSpecVerdict, "made", 0)
    defaults = Defaults(env="too-big")
    pod = seed_pod()
    pod["spec"]["tolerations"].append({"key": "x" * CACHED_SPEC_BYTES, "operator": "Exists"})
    for _ in range(3):
        assert new_pod(orjson.dumps(review(pod)), defaults) == judged_whole(pod, defaults)
    assert CountedSpecVerdict.made == 3
    assert not verdicts._VERDICTS.parts and not verdicts._VERDICTS.kept


def test_other_defaults_forget_what_was_kept() -> None:
    """Parts and verdicts kept under one Defaults are not used under another."""
    before, after = Defaults(env="before"), Defaults(env="after", env_taint=True, scheduler_name="other-scheduler")
    first, second = release(2)
    for pod in (first, first, second, second):
        new_pod(orjson.dumps(review(pod)), before)
    assert verdicts._VERDICTS.parts and verdicts._VERDICTS.kept
    answer = new_pod(orjson.dumps(review(second)), after)
    assert answer == judged_whole(second, after)
    assert answer != judged_whole(second, before)
    assert not verdicts._VERDICTS.parts and not verdicts._VERDICTS.kept  # seen once under `after`
