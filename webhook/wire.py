"""AdmissionReview bodies decoded to just what the webhook reads.

Most of an AdmissionReview is of no use here: userInfo, options, the requestKind copies, and in
the Pod its status, volumes, mounts and dozens of defaulted fields. Owner references are read: a
DaemonSet's Pod carries the DaemonSet controller's node term instead of a base requirement. msgspec
skips undeclared fields without building objects for them, which is most of the cost of reading a
review. Two subtrees of a new Pod stay undecoded (`msgspec.Raw`), affinity and tolerations: they
are read only the first time a spec is judged (webhook.verdicts keeps a verdict per spec).

A body whose shape differs from these declarations (a container that is not an object, say) is not
an error here: it is decoded in full, without a schema, and judged by the same rules, which name
the field that is wrong. The declarations only decide how fast a well-formed body is read.
"""

from __future__ import annotations

from typing import Any, TypedDict

import msgspec

#: The JSON value of a field left undecoded.
Raw = msgspec.Raw
DecodeError = msgspec.DecodeError


class GroupKind(TypedDict, total=False):
    """`request.kind`, of which webhook.admission reads the group and kind (not the version)."""

    group: Any
    kind: Any


class GroupResource(TypedDict, total=False):
    group: Any
    resource: Any


class _RequestHead(TypedDict, total=False):
    uid: Any
    kind: GroupKind
    resource: GroupResource
    subResource: Any
    operation: Any
    namespace: Any
    name: Any
    oldObject: msgspec.Raw


class Request(_RequestHead, total=False):
    #: Decoded when needed: a Pod at CREATE by `decode_new_pod`, anything else in full.
    object: msgspec.Raw


class Envelope(TypedDict, total=False):
    apiVersion: Any
    kind: Any
    request: Request


class Container(TypedDict, total=False):
    """What koupleless.model and koupleless.model_rules read of a container (the rules'
    `_IGNORED_CONTAINER_FIELDS` included)."""

    name: Any
    image: Any
    env: Any
    resources: Any
    command: Any
    args: Any
    livenessProbe: Any
    readinessProbe: Any
    startupProbe: Any
    lifecycle: Any


class PodSpec(TypedDict, total=False):
    """What koupleless.model_rules.validate_pod and webhook.defaults.default_ops read of a Pod's spec."""

    containers: list[Container]
    affinity: msgspec.Raw
    tolerations: msgspec.Raw
    initContainers: Any
    ephemeralContainers: Any
    nodeName: Any
    hostNetwork: Any
    hostPID: Any
    hostIPC: Any
    schedulerName: Any


class OwnerReference(TypedDict, total=False):
    """What koupleless.model.owned_by_daemonset reads of one."""

    apiVersion: Any
    kind: Any
    controller: Any


#: The fields of PodSpec left as Raw.
RAW_SPEC_FIELDS = ("affinity", "tolerations")


class Metadata(TypedDict, total=False):
    name: Any
    generateName: Any
    labels: Any
    deletionTimestamp: Any
    #: koupleless.model.owned_by_daemonset; part of a kept verdict's key (webhook.verdicts).
    ownerReferences: list[OwnerReference]


class NewPod(TypedDict, total=False):
    metadata: Metadata
    spec: PodSpec


class CreateRequest(_RequestHead, total=False):
    object: NewPod


class CreateEnvelope(TypedDict, total=False):
    apiVersion: Any
    kind: Any
    request: CreateRequest


_ENVELOPE = msgspec.json.Decoder(Envelope)
_CREATE_ENVELOPE = msgspec.json.Decoder(CreateEnvelope)
_NEW_POD = msgspec.json.Decoder(NewPod)
#: What kube-apiserver writes into every CREATE review (Go's encoding/json puts no spaces).
_CREATE = b'"operation":"CREATE"'
#: Without a schema. msgspec rather than orjson throughout, so that what one accepts (integers
#: beyond 64 bits, say) the other cannot refuse halfway through a request.
_ANY = msgspec.json.Decoder()


def decode_review(body: bytes) -> Any:
    """The body as a JSON value; a well-formed AdmissionReview with `request.object` and
    `request.oldObject` left as Raw. Raises DecodeError when the body is not JSON, or is nested
    deeper than a Kubernetes object ever is (skipping a subtree reads its depth too, so the parts
    left as Raw decode later)."""
    try:
        try:
            return _ENVELOPE.decode(body)
        except msgspec.ValidationError:
            return _ANY.decode(body)  # not an AdmissionReview: the caller names the field
    except RecursionError:
        raise msgspec.DecodeError("nested too deeply") from None


def decode_create(body: bytes) -> Any | None:
    """A body that reads like a CREATE decoded in one pass, with `request.object` read by
    `decode_new_pod`'s schema, or None when it does not (not by its bytes, or not of that shape).
    Most reviews are a new Pod's, and `decode_review` then `decode_new_pod` skips its object twice,
    which was the costliest part of reading it. The caller checks that the review is a Pod's CREATE
    (of any other object this reads too little), and else reads the body with `decode_review`."""
    if _CREATE not in body:
        return None
    try:
        return _CREATE_ENVELOPE.decode(body)
    except (msgspec.DecodeError, RecursionError):  # decode_review says what is wrong
        return None


def decode_new_pod(raw: msgspec.Raw) -> Any:
    """A Pod being created, with `spec.affinity` and `spec.tolerations` left as Raw when it has the
    shape of a Pod, else the whole JSON value."""
    try:
        return _NEW_POD.decode(raw)
    except msgspec.ValidationError:
        return _ANY.decode(raw)


def decode(value: Any) -> Any:
    """A field that may have been left undecoded, as a JSON value."""
    return _ANY.decode(value) if isinstance(value, msgspec.Raw) else value
