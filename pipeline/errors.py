"""One line for an error that happened somewhere else: in a Ray task, an actor or a Ray Train
worker. ``root_cause(exc)`` unwraps Ray's wrappers (``RayTaskError.cause``, Ray Train's
``worker_failures`` / ``controller_failure``, ``__cause__`` chains) to the innermost error and
gives ``Type: first line of its message`` without ANSI colour codes; an ``ActorDiedError``, whose
creation-task error is only text, gives the last ``Type: message`` line of that text.
"""
from __future__ import annotations

import re

__all__ = ["strip_ansi", "unwrap", "root_cause"]

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_ERROR_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)):\s*(.+)$")


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def unwrap(exc: BaseException) -> BaseException:
    """The innermost error behind Ray's wrappers and explicit ``raise ... from`` chains."""
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        failures = getattr(exc, "worker_failures", None)
        if isinstance(failures, dict) and failures:
            exc = failures[min(failures)]
            continue
        for attr in ("controller_failure", "cause"):
            inner = getattr(exc, attr, None)
            if isinstance(inner, BaseException):
                exc = inner
                break
        else:
            if isinstance(exc.__cause__, BaseException):
                exc = exc.__cause__
                continue
            break
    return exc


def _name(exc: BaseException) -> str:
    name = type(exc).__name__
    return re.sub(r"^RayTaskError\((\w+)\)$", r"\1", name)


def root_cause(exc: BaseException, limit: int = 500) -> str:
    """``Type: message`` of the error behind ``exc``, one line, no ANSI codes."""
    inner = unwrap(exc)
    text = strip_ansi(str(inner))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [m for line in lines if (m := _ERROR_LINE.match(line))]
    name = _name(inner)
    if errors and (name.startswith("RayTaskError") or "ActorDied" in name or "Ray" in name or len(lines) > 1):
        kind, message = errors[-1].group(1).rsplit(".", 1)[-1], errors[-1].group(2)
    else:
        kind, message = name, next((line for line in lines if not line.startswith("ray::")), "")
    out = f"{kind}: {message}" if message else kind
    return out[:limit]
