"""Reading v1 Node objects (plain dicts, possibly from the network): conditions and addresses.

Every reader tolerates any shape: a missing or malformed field reads as absent.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _items(node: Mapping[str, Any], field: str) -> list[dict[str, Any]]:
    status = node.get("status")
    values = status.get(field) if isinstance(status, dict) else None
    return [v for v in values if isinstance(v, dict)] if isinstance(values, list) else []


def condition_status(node: Mapping[str, Any], ctype: str = "Ready") -> str | None:
    """"True", "False", "Unknown" or None (no such condition)."""
    for c in _items(node, "conditions"):
        if c.get("type") == ctype:
            status = c.get("status")
            return status if isinstance(status, str) else None
    return None


def is_ready(node: Mapping[str, Any]) -> bool:
    return condition_status(node, "Ready") == "True"


def address(node: Mapping[str, Any], atype: str = "InternalIP") -> str:
    for a in _items(node, "addresses"):
        if a.get("type") == atype:
            value = a.get("address")
            return value if isinstance(value, str) else ""
    return ""
