"""Both MQTT dialects on the wire, byte for byte as the runtimes send them, and replies too large for
the old one-size limit (README "Compatibility")."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from koupleless import arklet, arklet_base_payloads, arklet_parse, arklet_replies

UUID = "3f2b8c1e-9d4a-4c7e-8b1f-2a6d5e9c0f13"
#: runtime 1.3.0 / 2.1.5: no baseMetadata, the base named only by its topic.
OLD_HEART = (
    b'{"publishTimestamp":1700000000000,"data":{"masterBizInfo":{"name":"base-web","version":"2.1.5"},'
    b'"networkInfo":{"localIP":"10.2.3.4","localHostName":"base-web-5f7c"},"state":"ACTIVATED"}}'
)
#: runtime 1.3.0: a failed install names no biz.
OLD_FAILURE = (
    b'{"publishTimestamp":1700000000100,"data":{"command":"installBiz","response":{"code":"FAILED",'
    b'"message":"install biz failed","data":{"code":"FAILED","message":"java.io.FileNotFoundException: '
    b'biz1.jar","elapsedSpace":0,"bizInfos":[]}}}}'
)
#: runtime 1.3.0: queryAllBiz (and a successful install) answered on base/biz.
OLD_BIZ = (
    b'{"publishTimestamp":1700000000200,"data":{"code":"SUCCESS","message":"","data":[{"bizName":"biz1",'
    b'"bizState":"activated","bizVersion":"0.0.1","mainClass":"com.example.Biz1","webContextPath":"biz1",'
    b'"bizStateRecords":[{"changeTime":1700000000150,"state":"ACTIVATED","reason":"STARTED","message":null}]}]}}'
)
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "bizoperation_install_2500_jars.json"


def test_old_heartbeat_is_a_base_named_by_its_topic_with_its_own_name_as_cluster() -> None:
    hb = arklet_parse.parse_heartbeat(arklet.decode_envelope(OLD_HEART).data, UUID)
    assert hb == arklet.Heartbeat(
        metadata=arklet.BaseMetadata(UUID, "base-web", "2.1.5", "base-web"),
        local_ip="10.2.3.4", local_hostname="base-web-5f7c", port=0, state=arklet.ACTIVATED,
        dialect=arklet.DIALECT_LEGACY,
    )
    assert hb.activated


def test_current_heartbeat_says_its_dialect() -> None:
    data = {"baseMetadata": {"identity": "10.1.0.45", "name": "base", "version": "1.0.0", "clusterName": "default"},
            "localIP": "10.1.0.45", "localHostName": "base-7d9f", "port": 0, "state": "activated"}
    assert arklet_parse.parse_heartbeat(data, "10.1.0.45").dialect == arklet.DIALECT_CURRENT


def test_a_heartbeat_of_neither_shape_names_both() -> None:
    with pytest.raises(arklet.ArkletError) as err:
        arklet_parse.parse_heartbeat({"localIP": "10.0.0.1", "state": "activated"}, "b")
    assert err.value.path == "data.baseMetadata"
    assert "baseMetadata" in err.value.fix and "masterBizInfo" in err.value.fix


@pytest.mark.parametrize(("data", "path"), [
    ({"masterBizInfo": "base", "state": "ACTIVATED"}, "data.masterBizInfo"),
    ({"masterBizInfo": {"name": 1}, "state": "ACTIVATED"}, "data.masterBizInfo.name"),
    ({"masterBizInfo": {"name": "b"}, "networkInfo": [], "state": "ACTIVATED"}, "data.networkInfo"),
    ({"masterBizInfo": {"name": "b"}, "networkInfo": {"arkletPort": "1238"}, "state": "ACTIVATED"},
     "data.networkInfo.arkletPort"),
    ({"masterBizInfo": {"name": "b"}}, "data.state"),
    ({"baseID": "someone-else", "masterBizInfo": {"name": "b"}, "state": "ACTIVATED"}, "data.baseID"),
])
def test_bad_old_heartbeats_name_the_field(data: dict[str, object], path: str) -> None:
    with pytest.raises(arklet.ArkletError) as err:
        arklet_parse.parse_heartbeat(data, UUID)
    assert err.value.path == path


def test_old_failure_names_no_biz() -> None:
    env = arklet_replies.decode_envelope(arklet.BIZ_OPERATION, OLD_FAILURE)
    op = arklet_parse.parse_biz_operation(env.data)
    assert (op.command, op.biz_name, op.biz_version, op.code) == (arklet.CMD_INSTALL_BIZ, "", "", arklet.CODE_FAILED)
    assert op.message == "install biz failed: java.io.FileNotFoundException: biz1.jar"


def test_old_module_list() -> None:
    env = arklet.decode_envelope(OLD_BIZ)
    assert arklet_parse.parse_biz(env.data) == [
        arklet.BizStatus("biz1", "0.0.1", arklet.ACTIVATED, 1700000000150, "STARTED", "")
    ]


def test_query_baseline_carries_base_metadata() -> None:
    data = {"identity": "10.1.0.45", "name": "base", "version": "1.0.0", "clusterName": "default"}
    assert arklet_parse.parse_base_metadata(data, "10.1.0.45") == arklet.BaseMetadata("10.1.0.45", "base", "1.0.0", "default")
    with pytest.raises(arklet.ArkletError) as err:
        arklet_parse.parse_base_metadata(data, "10.9.9.9")
    assert err.value.kind == "identity_mismatch"


def test_batch_install_response_entries() -> None:
    v1 = arklet.BizModel("biz1", "0.0.1", "https://h/biz1.jar")
    data = arklet_base_payloads.batch_install_response_data({
        "https://h/biz1.jar": arklet_base_payloads.batch_install_entry(arklet.CODE_SUCCESS, "", v1, arklet.ACTIVATED),
        "https://h/biz2.jar": arklet_base_payloads.batch_install_entry(arklet.CODE_FAILED, "REPEAT_BIZ: biz2:0.0.1 installed"),
    })
    payload = arklet.encode_envelope(data, 7)
    entries = arklet_replies.parse_batch_install_response(
        arklet_replies.decode_envelope(arklet.BATCH_INSTALL_RESPONSE, payload).data)
    assert entries == [
        arklet_replies.BatchEntry("https://h/biz1.jar", arklet.CODE_SUCCESS, "", "biz1", "0.0.1", arklet.ACTIVATED),
        arklet_replies.BatchEntry("https://h/biz2.jar", arklet.CODE_FAILED, "REPEAT_BIZ: biz2:0.0.1 installed"),
    ]
    with pytest.raises(arklet.ArkletError) as err:
        arklet_replies.parse_batch_install_response({**data, "command": "installBiz"})
    assert err.value.path == "data.command"


def test_an_install_reply_with_a_whole_class_path_is_read_by_the_fields_used() -> None:
    payload = FIXTURE.read_bytes()
    doc = orjson.loads(payload)
    assert len(doc["data"]["response"]["data"]["bizInfos"][0]["classPath"]) == 2500
    assert len(payload) > arklet.MAX_PAYLOAD_BYTES, "the fixture is larger than a status message may be"
    env = arklet_replies.decode_envelope(arklet.BIZ_OPERATION, payload)
    assert env.publish_ts_ms == 1732962665120
    assert "classPath" not in env.data["response"]["data"]["bizInfos"][0]
    op = arklet_parse.parse_biz_operation(env.data)
    assert op.success and op.installed_key == "biz1-web-single-host:0.0.1-SNAPSHOT" and op.biz_state == arklet.ACTIVATED


@pytest.mark.parametrize(("payload", "path"), [
    (b'{"publishTimestamp":1,"data":{"command":"installBiz","response":"ok"}}', "data.response"),
    (b'{"publishTimestamp":1,"data":{"command":"installBiz","response":{"code":"SUCCESS","data":{"bizInfos":[1]}}}}',
     "data.response.data.bizInfos[0]"),
    (b'{"publishTimestamp":1,"data":[]}', "data"),
    (b'[]', "payload"),
])
def test_bad_replies_name_the_field(payload: bytes, path: str) -> None:
    with pytest.raises(arklet.ArkletError) as err:
        arklet_replies.decode_envelope(arklet.BIZ_OPERATION, payload)
    assert err.value.kind == "wrong_type" and err.value.path == path


def test_reply_limits_are_per_topic() -> None:
    big = b'{"publishTimestamp":1,"data":"' + b"x" * arklet.MAX_PAYLOAD_BYTES + b'"}'
    with pytest.raises(arklet.ArkletError) as err:
        arklet.decode_envelope(big, arklet.payload_limit(arklet.HEART))
    assert err.value.kind == "too_large"
    huge = b" " * (arklet.payload_limit(arklet.BIZ_OPERATION) + 1)
    with pytest.raises(arklet.ArkletError) as err:
        arklet_replies.decode_envelope(arklet.BIZ_OPERATION, huge)
    assert err.value.kind == "too_large"
