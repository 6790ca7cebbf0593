"""Small helpers shared by every layer of the package (it imports nothing from convoy)."""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ``b``, in integers."""
    return -(-a // b)
