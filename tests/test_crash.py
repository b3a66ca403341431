"""Tests for L{coder1_wire.crash}: crash reports that carry no content."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from coder1_wire.crash import (
    MAX_FRAMES,
    MAX_REPORT_BYTES,
    build_crash_report,
    sanitize_crash_report,
    telemetry_enabled,
)

CANARY = "CANARY-123"
SECRET_PATH = "/home/alice/projects/secret-plans/notes.txt"
FAKE_FILE = "/home/alice/.local/lib/coder1_bridge/fake.py"

# The bridge module the crash happens in: only its name says it is ours.
OUR_SOURCE = """
class SpawnError(OSError):
    pass

def handle(path):
    raise ValueError("could not open " + path + " " + CANARY)

def spawn(path):
    raise SpawnError(2, CANARY, path)

def recurse(n):
    if n == 0:
        raise RuntimeError(CANARY)
    recurse(n - 1)

def call(f, *args):
    f(*args)

def local_error():
    class Local(KeyError):
        pass
    raise Local(CANARY)
"""

# Somebody else's module: neither its frames nor its class names are ours.
THEIR_SOURCE = """
class TheirError(LookupError):
    pass

def fail():
    raise TheirError(CANARY)

def call(f, *args):
    f(*args)
"""


def _module(name: str, source: str, filename: str) -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": name, "CANARY": CANARY}
    exec(compile(source, filename, "exec"), namespace)  # noqa: S102 -- fixed test source
    return namespace


OURS = _module("coder1_bridge.fake", OUR_SOURCE, FAKE_FILE)
THEIRS = _module("thirdparty.lib", THEIR_SOURCE, "/usr/lib/thirdparty/lib.py")


def _crash(f: Callable[..., object], *args: object) -> BaseException:
    try:
        f(*args)
    except BaseException as e:
        return e
    raise AssertionError("no crash")


def _report(f: Callable[..., object], *args: object) -> dict[str, Any]:
    return dict(build_crash_report(_crash(f, *args), version="0.1.0"))


def _valid() -> dict[str, Any]:
    return {
        "type": "coder1_bridge.commands.SpawnError",
        "frames": [{"module": "coder1_bridge.commands", "function": "handle", "line": 12}],
        "version": "0.1.0",
    }


def _with_frame(**changes: object) -> dict[str, Any]:
    report = _valid()
    report["frames"] = [{**report["frames"][0], **changes}]
    return report


# The shape the brief asks for, written out independently of the module.
_SPEC = {
    "type": re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,159}"),
    "version": re.compile(
        r"[0-9]{1,4}(\.[0-9]{1,4}){0,3}((a|b|rc)[0-9]{1,4})?(\.post[0-9]{1,4})?(\.dev[0-9]{1,4})?"
    ),
    "module": re.compile(r"coder1_(bridge|wire)(\.[a-z_][a-z0-9_]{0,39}){0,3}"),
    "function": re.compile(r"[A-Za-z_<>][A-Za-z0-9_<>]{0,59}"),
}


def _assert_valid(report: object) -> None:
    assert type(report) is dict
    assert set(report) == {"type", "frames", "version"}
    assert type(report["type"]) is str and _SPEC["type"].fullmatch(report["type"])
    assert type(report["version"]) is str and _SPEC["version"].fullmatch(report["version"])
    assert type(report["frames"]) is list and len(report["frames"]) <= 32
    for frame in report["frames"]:
        assert type(frame) is dict and set(frame) == {"module", "function", "line"}
        assert type(frame["module"]) is str and _SPEC["module"].fullmatch(frame["module"])
        assert type(frame["function"]) is str and _SPEC["function"].fullmatch(frame["function"])
        assert type(frame["line"]) is int and 1 <= frame["line"] <= 100_000


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
_frames = st.fixed_dictionaries(
    {
        "module": st.from_regex(_SPEC["module"], fullmatch=True),
        "function": st.from_regex(_SPEC["function"], fullmatch=True),
        "line": st.integers(1, 100_000),
    }
)
_reports = st.fixed_dictionaries(
    {
        "type": st.from_regex(_SPEC["type"], fullmatch=True),
        "frames": st.lists(_frames, max_size=MAX_FRAMES),
        "version": st.from_regex(_SPEC["version"], fullmatch=True),
    }
)


def _near_miss(report: dict[str, Any], data: st.DataObject) -> object:
    """C{report} with one part, possibly nested, replaced by arbitrary JSON."""
    target: dict[str, Any] = report
    if report["frames"] and data.draw(st.booleans()):
        target = data.draw(st.sampled_from(report["frames"]))
    key = data.draw(st.sampled_from(sorted(target)) | st.text())
    target[key] = data.draw(_json)
    return report


class BuildTests(SynchronousTestCase):
    """L{build_crash_report} names code, never data."""

    def test_no_message_no_path(self) -> None:
        """The exception's message, its arguments and file names are not in the report."""
        report = _report(OURS["handle"], SECRET_PATH)
        text = json.dumps(report)
        for secret in (CANARY, SECRET_PATH, FAKE_FILE, "alice", "could not open", "/"):
            self.assertNotIn(secret, text)
        self.assertEqual(
            report,
            {
                "type": "ValueError",
                "frames": [{"module": "coder1_bridge.fake", "function": "handle", "line": 6}],
                "version": "0.1.0",
            },
        )

    def test_only_our_frames(self) -> None:
        """Frames of other modules, here the test's and a third party's, are left out."""
        report = _report(THEIRS["call"], OURS["call"], THEIRS["call"], OURS["handle"], "x")
        self.assertEqual(
            [(f["module"], f["function"]) for f in report["frames"]],
            [("coder1_bridge.fake", "call"), ("coder1_bridge.fake", "handle")],
        )

    def test_our_exception_class(self) -> None:
        """An exception class of ours is named with its module."""
        report = _report(OURS["spawn"], SECRET_PATH)
        self.assertEqual(report["type"], "coder1_bridge.fake.SpawnError")
        self.assertNotIn(SECRET_PATH, json.dumps(report))

    def test_foreign_exception_class(self) -> None:
        """Anyone else's exception class is named by its nearest builtin base."""
        self.assertEqual(_report(THEIRS["fail"])["type"], "LookupError")

    def test_unnameable_class_of_ours(self) -> None:
        """A class of ours whose name does not fit the pattern falls back to its base."""
        self.assertEqual(_report(OURS["local_error"])["type"], "KeyError")

    def test_frame_limit(self) -> None:
        """Only the innermost frames are kept, up to the limit."""
        report = _report(OURS["recurse"], 100)
        self.assertEqual(len(report["frames"]), MAX_FRAMES)
        self.assertEqual(report["frames"][-1]["line"], 13)

    def test_sanitizes(self) -> None:
        """What the bridge builds, the relay accepts unchanged."""
        for report in (_report(OURS["handle"], "x"), _report(OURS["recurse"], 100)):
            self.assertEqual(sanitize_crash_report(report), report)


class SanitizeTests(SynchronousTestCase):
    """L{sanitize_crash_report} accepts exactly the report shape."""

    def test_valid(self) -> None:
        """A valid report comes back equal, as a copy."""
        report = _valid()
        clean = sanitize_crash_report(report)
        self.assertEqual(clean, report)
        assert clean is not None
        self.assertIsNot(clean, report)
        self.assertIsNot(clean["frames"][0], report["frames"][0])

    def test_extra_keys(self) -> None:
        """A key beyond the shape, at the top or in a frame, refuses the report."""
        self.assertIsNone(sanitize_crash_report({**_valid(), "message": CANARY}))
        self.assertIsNone(sanitize_crash_report(_with_frame(path=SECRET_PATH)))
        self.assertIsNone(sanitize_crash_report(_with_frame(args=[CANARY])))
        self.assertIsNone(sanitize_crash_report(_with_frame(locals={"x": CANARY})))

    def test_missing_keys(self) -> None:
        """A report or frame without one of its keys is refused."""
        for key in ("type", "frames", "version"):
            report = _valid()
            del report[key]
            self.assertIsNone(sanitize_crash_report(report))
        report = _valid()
        del report["frames"][0]["line"]
        self.assertIsNone(sanitize_crash_report(report))

    def test_long_strings(self) -> None:
        """Strings past their length limit are refused."""
        self.assertIsNone(sanitize_crash_report({**_valid(), "type": "E" * 161}))
        self.assertIsNotNone(sanitize_crash_report({**_valid(), "type": "E" * 160}))
        self.assertIsNone(sanitize_crash_report({**_valid(), "version": "1" * 5}))
        self.assertIsNone(sanitize_crash_report({**_valid(), "version": "1.2.3.4.5"}))
        self.assertIsNone(sanitize_crash_report(_with_frame(function="f" * 61)))
        self.assertIsNotNone(sanitize_crash_report(_with_frame(function="f" * 60)))
        self.assertIsNone(sanitize_crash_report(_with_frame(module="coder1_bridge." + "m" * 41)))
        self.assertIsNone(sanitize_crash_report(_with_frame(module="coder1_bridge" + ".m" * 4)))
        self.assertIsNone(sanitize_crash_report(_with_frame(module="coder1_bridge." + "m" * 10**6)))

    def test_largest_report_fits(self) -> None:
        """
        The largest report that passes encodes in under L{MAX_REPORT_BYTES}: the
        relay's size check, made before it parses, never refuses a valid one.
        """
        module = "coder1_bridge" + ("." + "m" * 40) * 3
        frame = {"module": module, "function": "f" * 60, "line": 100_000}
        report = {"type": "E" * 160, "frames": [frame] * MAX_FRAMES, "version": "9999.9999"}
        self.assertEqual(sanitize_crash_report(report), report)
        self.assertLess(len(json.dumps(report).encode()), MAX_REPORT_BYTES)

    def test_bad_modules(self) -> None:
        """Only modules of our packages, as dotted lower-case names, are accepted."""
        for module in (
            "os.path",
            "coder1_relay.telemetry",
            "coder1_bridgex",
            "coder1_bridge.",
            "coder1_bridge.Fake",
            "coder1_bridge./etc/passwd",
            "coder1_bridge.fake\n",
            "x.coder1_bridge",
            "",
        ):
            self.assertIsNone(sanitize_crash_report(_with_frame(module=module)), module)

    def test_bad_values(self) -> None:
        """Content in any field, wrong types and lines out of range are refused."""
        for changes in (
            {"function": "handle /tmp/x"},
            {"function": CANARY},
            {"line": 0},
            {"line": 100_001},
            {"line": True},
            {"line": 12.0},
            {"line": "12"},
            {"module": ["coder1_bridge"]},
        ):
            self.assertIsNone(sanitize_crash_report(_with_frame(**changes)), changes)
        for key, value in (
            ("type", "ValueError: " + CANARY),
            ("type", "builtins.ValueError\n"),
            ("version", CANARY),
            ("version", "x; rm -rf /"),
            ("version", "0.1.0\n"),
            ("version", "0.1.0+local"),
            ("version", "1e7f3a9"),
            ("version", 1),
            ("frames", {}),
            ("frames", [_valid()["frames"][0]] * (MAX_FRAMES + 1)),
        ):
            self.assertIsNone(sanitize_crash_report({**_valid(), key: value}), (key, value))

    def test_not_a_dict(self) -> None:
        """Anything but a dict is refused."""
        for obj in (None, [], "report", 7, [_valid()]):
            self.assertIsNone(sanitize_crash_report(obj))

    @settings(max_examples=300, deadline=None)
    @given(_json)
    def test_arbitrary_json(self, obj: object) -> None:
        """Arbitrary JSON never raises and gives None or a valid report."""
        clean = sanitize_crash_report(obj)
        if clean is not None:
            _assert_valid(clean)

    @settings(max_examples=100, deadline=None)
    @given(_reports, st.data())
    def test_near_misses(self, report: dict[str, Any], data: st.DataObject) -> None:
        """A valid report with one part replaced gives None or a valid report."""
        clean = sanitize_crash_report(_near_miss(report, data))
        if clean is not None:
            _assert_valid(clean)

    @settings(max_examples=100, deadline=None)
    @given(_reports)
    def test_valid_reports(self, report: dict[str, Any]) -> None:
        """Every report of the right shape is accepted unchanged."""
        self.assertEqual(sanitize_crash_report(report), report)


class TelemetryEnabledTests(SynchronousTestCase):
    """L{telemetry_enabled} reads the opt-out from the environment."""

    def test_default(self) -> None:
        """Without the variable, or with an empty one, telemetry is on."""
        self.assertTrue(telemetry_enabled({}))
        self.assertTrue(telemetry_enabled({"CODER1_TELEMETRY": ""}))

    def test_off(self) -> None:
        """false, 0, no and off turn it off, in any case and with stray spaces."""
        for value in ("false", "0", "no", "off", "FALSE", "No", "oFF", " off\n"):
            self.assertFalse(telemetry_enabled({"CODER1_TELEMETRY": value}), value)

    def test_on(self) -> None:
        """Any other value leaves it on."""
        for value in ("true", "1", "yes", "on", "disabled", "nope"):
            self.assertTrue(telemetry_enabled({"CODER1_TELEMETRY": value}), value)
