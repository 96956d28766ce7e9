"""bench/compare_reference.py's pure parts: its arguments, its table, the reference's Deployment,
and how it times a figure (to the watch event that completed it)."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path
from typing import Any

import pytest

from bench.compare_reference import (
    OURS,
    REFERENCE,
    RoundFailed,
    WatchedChanges,
    paired_ratios,
    parse_args,
    reference_deployment,
    seed_deployment,
    spread,
    table,
    where_time_went,
)
from koupleless import keys


def test_defaults_measure_ours_only_over_three_rounds() -> None:
    args = parse_args([])
    assert (args.reference_binary, args.rounds, args.many_bases, args.provider_arg) == (None, 3, 200, [])


def test_provider_args_are_passed_through_one_by_one() -> None:
    args = parse_args(["--provider-arg=--kube-qps=1000", "--provider-arg=--new-bases-per-minute=0"])
    assert args.provider_arg == ["--kube-qps=1000", "--new-bases-per-minute=0"]


def test_reference_binary_must_be_an_executable_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--reference-binary", str(tmp_path / "missing")])
    assert "--reference-binary" in capsys.readouterr().err
    binary = tmp_path / "module-controller"
    binary.write_bytes(b"")
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    assert parse_args(["--reference-binary", str(binary)]).reference_binary == str(binary.resolve())


def test_apiserver_profile_directory_is_made_or_refused_by_name(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    made = tmp_path / "profiles" / "today"
    assert parse_args(["--apiserver-profile", str(made)]).apiserver_profile == str(made)
    assert made.is_dir()
    taken = tmp_path / "a-file"
    taken.write_text("")
    with pytest.raises(SystemExit):
        parse_args(["--apiserver-profile", str(taken / "sub")])
    assert f"--apiserver-profile {taken / 'sub'}: cannot make that directory" in capsys.readouterr().err


def test_rounds_below_one_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--rounds", "0"])
    assert "--rounds 0" in capsys.readouterr().err


def test_spread_is_median_min_max_of_what_was_measured() -> None:
    assert spread([3.0, 1.0, 2.0, None]) == (2.0, 1.0, 3.0)
    assert spread([None, None]) is None


def row(lines: list[str], start: str) -> str:
    return next(line for line in lines if line.startswith(start))


def test_table_prints_both_sides_and_the_ratio_of_medians() -> None:
    results = {
        OURS: {"release": [1.0, 2.0, 3.0], "rss": [50.0, None, 60.0]},
        REFERENCE: {"release": [4.0, 4.0, 8.0], "rss": [100.0, 100.0, 100.0]},
    }
    lines = table(results, many=200)
    assert "ours/reference" in lines[0]
    release = row(lines, "release")
    assert "2.00 [1.00-3.00]" in release and "4.00 [4.00-8.00]" in release and " 0.5 " in release
    rss = row(lines, "controller RSS at 200 bases, steady (MiB)")
    assert "55.00 [50.00-60.00] (1/3 failed)" in rss and " 0.55 " in rss


def test_round_by_round_ratios_pair_the_two_sides_of_each_round() -> None:
    # Round 1 ran on a slow machine for both sides: its ratio is 1, where the medians say 0.5.
    results = {OURS: {"release": [1.0, 4.0, 1.0, None]}, REFERENCE: {"release": [2.0, 4.0, 2.0, 3.0]}}
    assert paired_ratios(results[OURS]["release"], results[REFERENCE]["release"]) == [0.5, 1.0, 0.5]
    release = row(table(results, many=200), "release")
    assert "0.5 [0.5-1]" in release and release.endswith("<= reference: met")


def test_each_figure_says_its_target_and_whether_the_median_met_it() -> None:
    results = {
        OURS: {"bases_many": [1.2, 1.3, 1.1], "base_lost": [50.0, 52.0, 51.0]},
        REFERENCE: {"bases_many": [1.0, 1.2, 1.0], "base_lost": [110.0, 119.0, 118.0]},
    }
    lines = table(results, many=200)
    assert row(lines, "200 bases -> 200 Ready Nodes").endswith("<= reference: NOT met")
    # Faster than the reference, but over its own 45 s limit.
    assert row(lines, "base lost").endswith("<= reference and <= 45 s: NOT met")
    ours_only = table({OURS: {"base_lost": [40.0]}}, many=200)
    assert row(ours_only, "base lost").endswith("<= 45 s: met")
    assert row(ours_only, "delete").endswith("-")
    # 1,000 bases have a limit of their own (3 s); other counts only "<= reference".
    thousand = table({OURS: {"bases_many": [4.5]}, REFERENCE: {"bases_many": [None]}}, many=1000)
    assert row(thousand, "1000 bases -> 1000 Ready Nodes").endswith("<= reference and <= 3 s: -")
    assert row(table({OURS: {"bases_many": [2.9]}}, many=1000), "1000 bases").endswith("<= 3 s: met")
    assert row(table({OURS: {"bases_many": [3.1]}}, many=1000), "1000 bases").endswith("<= 3 s: NOT met")
    assert row(table({OURS: {"bases_many": [3.1]}}, many=500), "500 bases").endswith("3.10 [3.10-3.10]")
    # The Leases after a registration are context: their ratio is shown, no target claimed.
    leases = row(table({OURS: {"leases_many": [1.5]}, REFERENCE: {"leases_many": [1.0]}}, many=200),
                 "200 bases -> their 200 Leases")
    assert " 1.5 " in leases and leases.endswith("1.5 [1.5-1.5]")


def test_registration_only_prints_only_the_registrations() -> None:
    lines = table({OURS: {"bases3": [0.1], "bases_many": [1.0], "release": [None]}}, many=200,
                  only=("bases3", "bases_many"))
    assert [line.split(" (s)")[0] for line in lines[1:]] == ["3 bases -> 3 Ready Nodes", "200 bases -> 200 Ready Nodes"]


def test_a_figure_the_reference_never_reached_has_no_ratio() -> None:
    lines = table({OURS: {"delete": [0.1]}, REFERENCE: {"delete": [None]}}, many=200)
    delete = row(lines, "delete")
    assert "- (1/1 failed)" in delete and delete.endswith("<= reference: -")


def test_without_the_reference_only_ours_is_printed() -> None:
    lines = table({OURS: {"bases_many": [5.0]}}, many=50)
    assert "reference" not in "\n".join(lines)
    assert "5.00 [5.00-5.00]" in row(lines, "50 bases -> 50 Ready Nodes (s)")


def test_reference_gets_the_seed_deployment_in_its_own_dialect() -> None:
    seed = seed_deployment("ns1")
    dep = reference_deployment("ns1", "cmp0r")
    template = dep["spec"]["template"]
    assert template["metadata"]["labels"][keys.LABEL_COMPONENT_LEGACY] == "module"
    assert keys.LABEL_COMPONENT not in template["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"] == {"app": template["metadata"]["labels"]["app"]}
    terms = template["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert [e["key"] for t in terms["nodeSelectorTerms"] for e in t["matchExpressions"]] == [
        keys.LABEL_BASE_VERSION, keys.LABEL_BASE_NAME]
    assert keys.env_toleration("cmp0r") in template["spec"]["tolerations"]
    anti = template["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["topologyKey"] == keys.LABEL_HOSTNAME
    # the seed's own Deployment, which ours gets, is left as shipped
    assert seed["metadata"]["namespace"] == "ns1"
    assert keys.LABEL_COMPONENT in seed["spec"]["template"]["metadata"]["labels"]


def test_where_time_went_prints_what_everyone_but_the_controller_needed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    line = where_time_went({"kube-apiserver": 3.0, "controller": 2.0, "etcd": 1.0},
                           {"POST nodes": 10.0}, {"POST nodes": 1010.0, "POST leases": 1000.0})
    assert line.startswith("CPU s kube-apiserver 3.00, controller 2.00, etcd 1.00")
    assert "total 6.00 on 2 CPUs; without the controller 4.00, at least 2.00 s of wall clock" in line
    assert line.endswith("API writes POST nodes 1000, POST leases 1000")


class FakeInformer:
    def __init__(self) -> None:
        self.handlers: list[Any] = []

    def add_handler(self, *handlers: Any) -> None:
        self.handlers = list(handlers)

    def add(self, obj: dict[str, Any]) -> None:
        self.handlers[0](obj)

    def update(self, obj: dict[str, Any]) -> None:
        self.handlers[1]({}, obj)

    def delete(self, obj: dict[str, Any]) -> None:
        self.handlers[2](obj)


def node(name: str, status: str) -> dict[str, Any]:
    return {"metadata": {"name": name}, "status": {"conditions": [{"type": "Ready", "status": status}]}}


async def test_a_figure_ends_at_the_watch_event_that_completed_it() -> None:
    nodes, pods, leases = FakeInformer(), FakeInformer(), FakeInformer()
    changes = WatchedChanges(nodes, pods, leases)  # type: ignore[arg-type]
    nodes.add(node("n1", "False"))
    nodes.add(node("n2", "True"))
    leases.add({"metadata": {"name": "n1"}})
    assert changes.ready_nodes == {"n2"} and changes.leases == {"n1"}
    # Woken by the event itself: a tick far longer than the test would time it out first.
    waiting = asyncio.ensure_future(changes.wait(lambda: {"n1", "n2"} <= changes.ready_nodes, 30, "2 Ready", tick=30))
    await asyncio.sleep(0)
    assert not waiting.done()
    nodes.update(node("n1", "True"))
    assert await asyncio.wait_for(waiting, 5) >= 0
    nodes.update(node("n2", "False"))
    nodes.delete(node("n1", "True"))
    leases.delete({"metadata": {"name": "n1"}})
    assert changes.ready_nodes == set() and changes.leases == set()
    with pytest.raises(RoundFailed, match="timed out after 0s waiting for nothing"):
        await changes.wait(lambda: False, 0.01, "nothing", tick=0.005)
