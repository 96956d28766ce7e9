"""The base's replies to commands, read by the fields the provider uses and nothing else.

An install reply (`base/bizOperation`) and a baseline's answer (`base/batchInstallBizResponse`)
carry each installed biz's whole SOFAArk description, its class path included: 18 KB for a base
plugin of 110 jars, hundreds of kB for a big base, times the modules of a baseline. msgspec decodes
such a payload against the few fields below and skips everything else without building it, so a
large reply costs about what it takes to scan it. What is kept is handed to the plain-JSON parsers of
koupleless.arklet, which check it and name any wrong field, so both paths refuse the same things.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import msgspec

from koupleless import arklet, arklet_parse


class _Slim(msgspec.Struct, omit_defaults=True):
    """A JSON object of which only the declared fields are read; leaves are typed Any so that
    koupleless.arklet's parsers, not msgspec, judge their types."""


class _BizInfo(_Slim):
    bizName: Any = msgspec.UNSET
    bizVersion: Any = msgspec.UNSET
    bizState: Any = msgspec.UNSET


class _InstallData(_Slim):
    code: Any = msgspec.UNSET
    message: Any = msgspec.UNSET
    bizInfos: list[_BizInfo] | msgspec.UnsetType | None = msgspec.UNSET


class _Response(_Slim):
    code: Any = msgspec.UNSET
    message: Any = msgspec.UNSET
    data: _InstallData | msgspec.UnsetType | None = msgspec.UNSET


class _BizOperation(_Slim):
    command: Any = msgspec.UNSET
    bizName: Any = msgspec.UNSET
    bizVersion: Any = msgspec.UNSET
    response: _Response | msgspec.UnsetType | None = msgspec.UNSET


class _BatchEntry(_Slim):
    code: Any = msgspec.UNSET
    message: Any = msgspec.UNSET
    bizInfos: list[_BizInfo] | msgspec.UnsetType | None = msgspec.UNSET


class _BatchData(_Slim):
    code: Any = msgspec.UNSET
    message: Any = msgspec.UNSET
    bizUrlToResponse: dict[str, _BatchEntry] | msgspec.UnsetType | None = msgspec.UNSET


class _BatchResponse(_Slim):
    code: Any = msgspec.UNSET
    message: Any = msgspec.UNSET
    data: _BatchData | msgspec.UnsetType | None = msgspec.UNSET


class _Batch(_Slim):
    command: Any = msgspec.UNSET
    response: _BatchResponse | msgspec.UnsetType | None = msgspec.UNSET


class _BizOperationEnvelope(_Slim):
    publishTimestamp: Any = msgspec.UNSET
    data: _BizOperation | msgspec.UnsetType | None = msgspec.UNSET


class _BatchEnvelope(_Slim):
    publishTimestamp: Any = msgspec.UNSET
    data: _Batch | msgspec.UnsetType | None = msgspec.UNSET


_DECODERS: dict[str, msgspec.json.Decoder[Any]] = {
    arklet.BIZ_OPERATION: msgspec.json.Decoder(_BizOperationEnvelope),
    arklet.BATCH_INSTALL_RESPONSE: msgspec.json.Decoder(_BatchEnvelope),
}
SLIM_KINDS = frozenset(_DECODERS)
_AT = re.compile(r"at `\$(.*)`")


def decode_envelope(kind: str, payload: bytes) -> arklet.Envelope:
    """The envelope of a reply on `kind` (one of SLIM_KINDS), its data reduced to what is read."""
    arklet.check_size(payload, arklet.payload_limit(kind))
    try:
        doc = _DECODERS[kind].decode(payload)
    except msgspec.ValidationError as exc:
        found = _AT.search(str(exc))
        path = found.group(1).lstrip(".") if found else ""
        path = "payload" if not path else path
        what = str(exc).split(" - at ")[0]
        raise arklet.ArkletError("wrong_type", path, what, "send the shape arklet sends (reference §2.3)") from None
    except msgspec.DecodeError as exc:
        raise arklet.ArkletError("not_json", "payload", f"is not JSON ({exc})", "publish a UTF-8 JSON object") from None
    return arklet.check_envelope(msgspec.to_builtins(doc))


@dataclass(frozen=True, slots=True)
class BatchEntry:
    """How one baseline jar went: the bizUrl it was asked by, the reply's code and message, and the
    biz the base says it installed (bizInfos[0]), when it says."""

    biz_url: str
    code: str
    message: str = ""
    installed_name: str = ""
    installed_version: str = ""
    biz_state: str = ""

    @property
    def success(self) -> bool:
        return self.code == arklet.CODE_SUCCESS


def parse_batch_install_response(data: Any) -> list[BatchEntry]:
    """A batchInstallBizResponse's data (reference §2.3): one entry per bizUrl of the baseline."""
    obj = arklet_parse.want_object(data, "data", "{command, response: {code, message, data: {bizUrlToResponse}}}")
    command = arklet_parse.want_string(obj, "command", "data", required=True)
    if command != arklet.BATCH_INSTALL_COMMAND:
        raise arklet.ArkletError("wrong_type", "data.command", f"{command!r} is not {arklet.BATCH_INSTALL_COMMAND}",
                                 f"reply to a baseline with command {arklet.BATCH_INSTALL_COMMAND}")
    response = arklet_parse.want_object(obj.get("response"), "data.response", "an arklet Output {code, message, data}")
    inner = response.get("data")
    if inner is None:
        return []
    inner = arklet_parse.want_object(inner, "data.response.data", "{code, message, bizUrlToResponse}")
    per_url = inner.get("bizUrlToResponse")
    if per_url is None:
        return []
    per_url = arklet_parse.want_object(per_url, "data.response.data.bizUrlToResponse", "an object keyed by bizUrl")
    out = []
    for url, entry in per_url.items():
        path = f"data.response.data.bizUrlToResponse[{url!r}]"
        entry = arklet_parse.want_object(entry, path, "{code, message, bizInfos}")
        name = version = state = ""
        infos = entry.get("bizInfos")
        if isinstance(infos, list) and infos and isinstance(infos[0], dict):
            name = arklet_parse.want_string(infos[0], "bizName", f"{path}.bizInfos[0]")
            version = arklet_parse.want_string(infos[0], "bizVersion", f"{path}.bizInfos[0]")
            state = arklet_parse.want_string(infos[0], "bizState", f"{path}.bizInfos[0]").upper()
        out.append(BatchEntry(
            biz_url=url,
            code=arklet_parse.want_string(entry, "code", path, required=True).upper(),
            message=arklet_parse.want_string(entry, "message", path),
            installed_name=name,
            installed_version=version,
            biz_state=state,
        ))
    return out
