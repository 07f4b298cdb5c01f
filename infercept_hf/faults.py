"""Naming a failure without failing again.

Whatever goes wrong while the engine works for one request ends that request with a message
built here. The message must never raise itself: an exception whose `__str__` raises, or a
tool value whose `__repr__` raises, would otherwise escape on the engine's thread.
"""
from __future__ import annotations

from typing import Any


class RequestFault(Exception):
    """A failure that belongs to one request: it ends that request, never the engine."""


class AnswerError(RequestFault, ValueError):
    """A tool answer this request cannot use."""


def safe_str(value: Any) -> str:
    try:
        return str(value)
    except Exception:  # noqa: BLE001 - the text is only a description
        return f"<{type(value).__name__} whose str() raised>"


def safe_repr(value: Any, limit: int = 60) -> str:
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - the text is only a description
        return f"<{type(value).__name__} whose repr() raised>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(exc: BaseException) -> str:
    """`TypeName: message`, or just the type name when the message is empty."""
    text = safe_str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
