"""The arklet codec against payloads shaped like a real base's (reference §2.3)."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from koupleless import arklet, arklet_base_payloads, arklet_parse

REAL_HEART = (
    b'{"publishTimestamp":1726000000000,"data":{"baseMetadata":{"identity":"10.1.0.45","name":"base",'
    b'"version":"1.0.0","clusterName":"default"},"localIP":"10.1.0.45","localHostName":"base-7d9f",'
    b'"port":0,"state":"activated"}}'
)


def test_topics_round_trip() -> None:
    t = arklet.topic("DEV", "10.1.0.45", arklet.HEART)
    assert t == "koupleless_dev/10.1.0.45/base/heart"
    assert arklet.parse_topic("dev", t) == ("10.1.0.45", arklet.HEART)
    assert arklet.parse_topic("dev", "koupleless_dev/b1/installBiz", direction="command") == ("b1", "installBiz")
    assert arklet.controller_subscription("dev") == "koupleless_dev/+/base/+"


@pytest.mark.parametrize(
    "name", ["koupleless_prod/b1/base/heart", "koupleless_dev/b1/base/nonsense", "koupleless_dev//base/heart"]
)
def test_unknown_topics_are_named(name: str) -> None:
    with pytest.raises(arklet.ArkletError) as err:
        arklet.parse_topic("dev", name)
    assert err.value.kind == "unknown_topic"
    assert name in str(err.value)


def test_real_heartbeat() -> None:
    env = arklet.decode_envelope(REAL_HEART)
    assert env.publish_ts_ms == 1726000000000
    hb = arklet_parse.parse_heartbeat(env.data, "10.1.0.45")
    assert hb.activated
    assert hb.metadata == arklet.BaseMetadata("10.1.0.45", "base", "1.0.0", "default")
    assert (hb.local_ip, hb.local_hostname, hb.port) == ("10.1.0.45", "base-7d9f", 0)
    # what we encode for base-sim decodes back to the same heartbeat
    again = arklet.decode_envelope(arklet.encode_envelope(hb.to_wire(), 5))
    assert arklet_parse.parse_heartbeat(again.data, "10.1.0.45") == hb


def test_identity_must_match_topic() -> None:
    env = arklet.decode_envelope(REAL_HEART)
    with pytest.raises(arklet.ArkletError) as err:
        arklet_parse.parse_heartbeat(env.data, "10.9.9.9")
    assert err.value.kind == "identity_mismatch"
    assert err.value.path == "data.baseMetadata.identity"


@pytest.mark.parametrize(
    ("payload", "kind", "path"),
    [
        (b"not json", "not_json", "payload"),
        (b"[1,2]", "wrong_type", "payload"),
        (b'{"publishTimestamp":"yesterday","data":{}}', "wrong_type", "publishTimestamp"),
        (b'{"publishTimestamp":1}', "wrong_type", "data"),
        (b'{"publishTimestamp":1,"data":"' + b"x" * (arklet.MAX_PAYLOAD_BYTES + 1) + b'"}', "too_large", "payload"),
    ],
)
def test_bad_envelopes(payload: bytes, kind: str, path: str) -> None:
    with pytest.raises(arklet.ArkletError) as err:
        arklet.decode_envelope(payload)
    assert (err.value.kind, err.value.path) == (kind, path)
    assert err.value.fix


def test_wrong_types_name_the_field() -> None:
    data = orjson.loads(REAL_HEART)["data"]
    data["baseMetadata"]["version"] = 2
    with pytest.raises(arklet.ArkletError) as err:
        arklet_parse.parse_heartbeat(data, "10.1.0.45")
    assert err.value.path == "data.baseMetadata.version"
    assert "expected a string, got a number" in str(err.value)


def test_simple_biz_and_legacy_biz() -> None:
    simple = arklet_parse.parse_simple_biz(
        [
            {
                "name": "biz1",
                "version": "0.0.1",
                "state": "activated",
                "latestStateRecord": {"changeTime": 1726000000000, "state": "ACTIVATED", "reason": "STARTED",
                                      "message": None},
            },
            {"name": "biz2", "version": "1", "state": "broken", "latestStateRecord": None},
        ]
    )
    assert [(b.key, b.state, b.change_time_ms, b.reason) for b in simple] == [
        ("biz1:0.0.1", "ACTIVATED", 1726000000000, "STARTED"),
        ("biz2:1", "BROKEN", None, ""),
    ]
    legacy = arklet_parse.parse_biz(
        {"code": "SUCCESS", "data": [{"bizName": "biz1", "bizVersion": "0.0.1", "bizState": "deactivated",
                                      "bizStateRecords": [{"changeTime": 1, "state": "ACTIVATED"},
                                                          {"changeTime": 2, "state": "DEACTIVATED",
                                                           "reason": "SWITCHED", "message": "new version"}]}]}
    )
    assert legacy == [arklet.BizStatus("biz1", "0.0.1", "DEACTIVATED", 2, "SWITCHED", "new version")]
    with pytest.raises(arklet.ArkletError) as err:
        arklet_parse.parse_simple_biz([{"name": "x", "state": 3}])
    assert err.value.path == "data[0].state"


def test_install_failure_carries_the_base_message() -> None:
    data = {
        "command": "installBiz",
        "bizName": "biz1",
        "bizVersion": "0.0.1",
        "response": {"code": "FAILED", "message": "install biz failed",
                     "data": {"code": "FAILED", "message": "java.io.FileNotFoundException: biz1.jar"}},
    }
    op = arklet_parse.parse_biz_operation(data)
    assert not op.success
    assert op.key == "biz1:0.0.1"
    assert "java.io.FileNotFoundException: biz1.jar" in op.message
    # and what base-sim publishes parses the same way
    model = arklet.BizModel("biz1", "0.0.1", "https://h/biz1.jar")
    sim = arklet_base_payloads.biz_operation_data(arklet.CMD_INSTALL_BIZ, model, "FAILED", "disk full")
    assert arklet_parse.parse_biz_operation(sim).message == "disk full"
    ok = arklet_base_payloads.biz_operation_data(arklet.CMD_INSTALL_BIZ, model, "SUCCESS", biz_state="ACTIVATED")
    parsed = arklet_parse.parse_biz_operation(ok)
    assert parsed.success and parsed.biz_state == "ACTIVATED"


def test_health_report() -> None:
    report = arklet_parse.parse_health(arklet_base_payloads.health_data(memory_mb=2048, cpu_count=4, run_time_s=12.5))
    assert report.ok
    assert report.memory_bytes == 2048 * 1024 * 1024
    assert report.cpu_count == 4
    assert report.run_time_s == 12.5
    assert report.master_biz_state == "ACTIVATED"
    with pytest.raises(arklet.ArkletError) as err:
        arklet_parse.parse_health({"code": "SUCCESS", "data": {"healthData": {"jvm": {"max memory(M)": "lots"}}}})
    assert err.value.path == "data.data.healthData.jvm.max memory(M)"


def test_biz_model_command() -> None:
    model = arklet.BizModel("biz1", "0.0.1-SNAPSHOT", "https://h/biz1.jar")
    assert orjson.loads(arklet.encode_command(model)) == {
        "bizName": "biz1", "bizVersion": "0.0.1-SNAPSHOT", "bizUrl": "https://h/biz1.jar"}
    assert arklet_parse.parse_biz_model(arklet.encode_command(model)) == model
    assert arklet.encode_command() == b"{}"
    with pytest.raises(arklet.ArkletError):
        arklet_parse.parse_biz_model(b'{"bizName":"biz1","bizUrl":"u"}')


@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_escape_as_other_errors(payload: bytes) -> None:
    try:
        env = arklet.decode_envelope(payload)
        arklet_parse.parse_heartbeat(env.data, "b")
    except arklet.ArkletError:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)


@given(json_values)
def test_arbitrary_json_shapes_raise_only_arklet_errors(data: object) -> None:
    for parse in (arklet_parse.parse_simple_biz, arklet_parse.parse_biz, arklet_parse.parse_biz_operation, arklet_parse.parse_health):
        try:
            parse(data)
        except arklet.ArkletError:
            pass
    try:
        arklet_parse.parse_heartbeat(data, "b")
    except arklet.ArkletError:
        pass
