"""Kubernetes resource quantities (`512Mi`, `1.5G`, `100m`, `2e3`) as exact numbers, and back to text.

The extender compares a module Pod's memory request with a base's allocatable memory, and reads a
base's module capacity from `status.allocatable`; both arrive as quantity strings.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {
    "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": Decimal(1),
    "k": Decimal("1e3"), "M": Decimal("1e6"), "G": Decimal("1e9"), "T": Decimal("1e12"),
    "P": Decimal("1e15"), "E": Decimal("1e18"),
}
_QUANTITY = re.compile(r"^([+-]?(?:\d+\.?\d*|\.\d+))(?:(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE])|[eE]([+-]?\d+))?$")


def parse_quantity(text: object) -> Decimal:
    """The exact value of a quantity; ValueError naming the text otherwise. Integers (the JSON
    number some clients write) are accepted as they are."""
    if isinstance(text, bool):
        raise ValueError(f"{text!r} is not a quantity")
    if isinstance(text, int):
        return Decimal(text)
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not a quantity")
    match = _QUANTITY.match(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a quantity (e.g. 512Mi, 1G, 100m)")
    number, suffix, exponent = match.groups()
    try:
        value = Decimal(number)
        if exponent is not None:
            return value.scaleb(int(exponent))
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only valid decimals
        raise ValueError(f"{text!r} is not a quantity") from exc
    suffix = suffix or ""
    if suffix in _BINARY:
        return value * _BINARY[suffix]
    return value * _DECIMAL[suffix]


def _whole(text: object, rounding: str) -> int | None:
    """A non-negative whole number from a quantity; None when absent, unreadable or negative."""
    if text is None:
        return None
    try:
        value = parse_quantity(text)
    except ValueError:
        return None
    whole = int(value.to_integral_value(rounding=rounding))
    return whole if whole >= 0 else None


def quantity_bytes(text: object) -> int | None:
    """Bytes, rounded up as the scheduler does; None when absent or unreadable."""
    return _whole(text, "ROUND_CEILING")


def quantity_count(text: object) -> int | None:
    """A whole count (extended resources are integers); None when absent or unreadable."""
    return _whole(text, "ROUND_FLOOR")


def format_bytes(n: int) -> str:
    """The shortest exact spelling a user would write: 512Mi, 2Gi, 500M, or plain bytes."""
    for suffix, unit in (("Ei", 2**60), ("Pi", 2**50), ("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20)):
        if n >= unit and n % unit == 0:
            return f"{n // unit}{suffix}"
    for suffix, unit in (("T", 10**12), ("G", 10**9), ("M", 10**6)):
        if n >= unit and n % unit == 0:
            return f"{n // unit}{suffix}"
    if n >= 2**10 and n % 2**10 == 0:
        return f"{n // 2**10}Ki"
    if n >= 1000 and n % 1000 == 0:
        return f"{n // 1000}k"
    return str(n)
