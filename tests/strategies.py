"""hypothesis strategies for network input, shared by the fuzz tests."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st


def json_values(*, floats: bool) -> st.SearchStrategy[Any]:
    """Small JSON values of any shape: scalars, and lists and objects of them."""
    scalars = st.none() | st.booleans() | st.integers(-(2**31), 2**31) | st.text(max_size=8)
    if floats:
        scalars |= st.floats(allow_nan=False)
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
        max_leaves=8,
    )


def mostly(strategy: st.SearchStrategy[Any], garbage: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly well-typed, sometimes garbage: network input."""
    return st.one_of(strategy, strategy, strategy, garbage)
