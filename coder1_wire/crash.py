"""
Content-free crash reports.

The bridge builds one when it crashes and sends it to the relay in a
L{Kind.CRASH<coder1_wire.envelope.Kind.CRASH>} control frame; the relay checks
it again with L{sanitize_crash_report} before keeping it.  A report names only
code: the exception's class and the frames of our own packages (module,
function, line).  Never a message, an argument, a local, a file path or a
frame of anyone else's code: those are where the user's data lives.

Every field has a bound, and so has the whole report (L{MAX_REPORT_BYTES}).
What passes here is only well formed: the relay keeps no name a bridge wrote,
only the names its own copy of the bridge's code holds
(L{coder1_relay.code_names}).
"""

from __future__ import annotations

import re
import traceback
from collections.abc import Mapping, Sequence
from types import FrameType
from typing import TypedDict

OUR_PACKAGES = ("coder1_bridge", "coder1_wire")
#: The innermost frames a report keeps.
MAX_FRAMES = 32
MAX_LINE = 100_000
#: A report's JSON encoding, at most: the relay refuses a larger one unread.
MAX_REPORT_BYTES = 16384

# Always used with fullmatch: a bare "$" also matches before a trailing newline.
# A version is numbers and the fixed markers of PEP 440 (a, b, rc, .post, .dev),
# nothing else: no letters a bridge could spell a word with.
VERSION = re.compile(
    r"[0-9]{1,4}(\.[0-9]{1,4}){0,3}((a|b|rc)[0-9]{1,4})?(\.post[0-9]{1,4})?(\.dev[0-9]{1,4})?"
)
_MODULE = re.compile(r"coder1_(bridge|wire)(\.[a-z_][a-z0-9_]{0,39}){0,3}")
_FUNCTION = re.compile(r"[A-Za-z_<>][A-Za-z0-9_<>]{0,59}")
_TYPE = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,159}")

_REPORT_KEYS = frozenset({"type", "frames", "version"})
_FRAME_KEYS = frozenset({"module", "function", "line"})
_OPT_OUT = frozenset({"false", "0", "no", "off"})


class Frame(TypedDict):
    """One frame of our own code."""

    module: str
    function: str
    line: int


class CrashReport(TypedDict):
    """What a bridge may say about a crash, and all the relay keeps of it."""

    type: str
    frames: list[Frame]
    version: str


def build_crash_report(
    exc: BaseException, *, package_roots: Sequence[str] = OUR_PACKAGES, version: str
) -> CrashReport:
    """
    Describe C{exc} by its class and the frames of our packages in its traceback.

    The type is C{module.QualName} for a class of ours, the bare name for a
    builtin, and otherwise the nearest such base class.  The innermost
    L{MAX_FRAMES} frames are kept, outermost first.
    """
    frames = [
        frame
        for frame in (_frame(f, line) for f, line in traceback.walk_tb(exc.__traceback__))
        if _is_ours(frame["module"], package_roots) and _sanitize_frame(frame) is not None
    ]
    return {
        "type": _type_name(type(exc), package_roots),
        "frames": frames[-MAX_FRAMES:],
        "version": version,
    }


def sanitize_crash_report(obj: object) -> CrashReport | None:
    """
    A clean copy of C{obj} if it is exactly a crash report, else L{None}.

    Exact types (no bool for an int, no subclasses), no missing or extra keys,
    every string matching its pattern and so of bounded length, at most
    L{MAX_FRAMES} frames: a report that passes is at most a few kilobytes.
    """
    if type(obj) is not dict or obj.keys() != _REPORT_KEYS:
        return None
    frames = obj["frames"]
    if not (
        _matches(_TYPE, obj["type"])
        and is_version(obj["version"])
        and type(frames) is list
        and len(frames) <= MAX_FRAMES
    ):
        return None
    clean: list[Frame] = []
    for frame in frames:
        checked = _sanitize_frame(frame)
        if checked is None:
            return None
        clean.append(checked)
    return {"type": obj["type"], "frames": clean, "version": obj["version"]}


def is_version(value: object) -> bool:
    """Whether C{value} is a string that looks like a version number, and nothing more."""
    return _matches(VERSION, value)


def telemetry_enabled(environ: Mapping[str, str]) -> bool:
    """Telemetry is on unless C{CODER1_TELEMETRY} says false, 0, no or off."""
    return environ.get("CODER1_TELEMETRY", "").strip().lower() not in _OPT_OUT


def _frame(frame: FrameType, line: int) -> Frame:
    # The module comes from the frame's globals, never from its file name.
    module = frame.f_globals.get("__name__")
    return {
        "module": module if type(module) is str else "",
        "function": frame.f_code.co_name,
        "line": line,
    }


def _sanitize_frame(obj: object) -> Frame | None:
    if type(obj) is not dict or obj.keys() != _FRAME_KEYS:
        return None
    line = obj["line"]
    if not (
        _matches(_MODULE, obj["module"])
        and _matches(_FUNCTION, obj["function"])
        and type(line) is int
        and 1 <= line <= MAX_LINE
    ):
        return None
    return {"module": obj["module"], "function": obj["function"], "line": line}


def _type_name(cls: type[BaseException], package_roots: Sequence[str]) -> str:
    # BaseException is in every MRO, so some class always qualifies.
    return next(
        name
        for name in (_qualified(base, package_roots) for base in cls.__mro__)
        if name is not None and _TYPE.fullmatch(name)
    )


def _qualified(cls: type, package_roots: Sequence[str]) -> str | None:
    if cls.__module__ == "builtins":
        return cls.__qualname__
    if _is_ours(cls.__module__, package_roots):
        return f"{cls.__module__}.{cls.__qualname__}"
    return None


def _is_ours(module: str, package_roots: Sequence[str]) -> bool:
    return any(module == root or module.startswith(root + ".") for root in package_roots)


def _matches(pattern: re.Pattern[str], value: object) -> bool:
    return type(value) is str and pattern.fullmatch(value) is not None
