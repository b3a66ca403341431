"""
Tests for C{coder1-bridge doctor}: one line per check, in order, against a
real relay; each failure said with what to do, later steps skipped.
"""

from __future__ import annotations

import io
import re

from twisted.internet.task import Clock
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from coder1_bridge import cli
from coder1_bridge.doctor import Doctor, Failed
from coder1_bridge.relay_api import RelayAnswer

from .loopback import RelayAndPage, reactor, stop_all

STEPS = ["config", "dns", "tcp", "tls", "token", "clock", "shell", "pty", "proxy"]


def lines(out: str) -> list[tuple[str, str, str]]:
    """(mark, check, what it said) for each check line."""
    return [
        (m.group(1), m.group(2), m.group(3))
        for m in re.finditer(r"^(ok|FAIL|skip) +(\w+) +(.*)$", out, re.M)
    ]


class DoctorTests(RelayAndPage):
    """The checks against a real relay."""

    async def start(self) -> None:
        await super().start()
        self.environ = {"SHELL": "/bin/sh"}

    async def cli(self, *argv: str) -> tuple[int, str]:
        out = io.StringIO()
        code = await cli.run(
            ["--config-dir", self.config_dir.path, *argv],
            reactor=reactor,
            out=out,
            environ=self.environ,
        )
        return code, out.getvalue()

    async def pair(self) -> None:
        code = await self.browser.new_code()
        relay = ["--relay", self.relay.context.public_url, "--ca-cert", self.ca.path]
        status, out = await self.cli("pair", *relay, code)
        self.assertEqual(status, 0, out)

    async def test_everything_passes(self) -> None:
        """Paired with a live relay: nine lines, each ok, in order, and status 0."""
        await self.pair()
        status, out = await self.cli("doctor")
        self.assertEqual(status, 0, out)
        found = lines(out)
        self.assertEqual([(mark, step) for mark, step, _ in found], [("ok", s) for s in STEPS])
        said = {step: text for _, step, text in found}
        self.assertIn("localhost (the relay) is 127.0.0.1", said["dns"])
        self.assertIn("TLS 1.3; the certificate of localhost is trusted", said["tls"])
        self.assertIn("the relay accepts this bridge's token", said["token"])
        self.assertIn("terminals run /bin/sh", said["shell"])
        self.assertIn("Every check passed.", out)

    async def test_relay_down(self) -> None:
        """
        With the relay gone, the TCP step fails saying so, the steps that need the relay are
        skipped, the local ones still run, and the status is 1.
        """
        await self.pair()
        await stop_all(self.relay)
        status, out = await self.cli("doctor")
        self.assertEqual(status, 1)
        marks = {step: mark for mark, step, _ in lines(out)}
        self.assertEqual(
            marks,
            {
                "config": "ok",
                "dns": "ok",
                "tcp": "FAIL",
                "tls": "skip",
                "token": "skip",
                "clock": "skip",
                "shell": "ok",
                "pty": "ok",
                "proxy": "ok",
            },
        )
        self.assertIn("Nothing accepts connections at localhost:", out)

    async def test_problems_are_named(self) -> None:
        """
        Not paired, an untrusted certificate (through --relay, before pairing), a revoked
        token, a shell that cannot run and a proxy setting that is not a URL each fail their
        own line, with what to do.
        """
        self.environ = {"SHELL": "/no/such/shell", "HTTPS_PROXY": "socks5://proxy:1080"}
        status, out = await self.cli("doctor", "--relay", self.relay.context.public_url)
        self.assertEqual(status, 1)
        said = {step: (mark, text) for mark, step, text in lines(out)}
        self.assertEqual(said["config"][0], "FAIL")
        self.assertIn("coder1-bridge pair CODE", said["config"][1])
        self.assertEqual(said["shell"][0], "FAIL")
        self.assertIn("set SHELL to your login shell", said["shell"][1])
        self.assertEqual(said["proxy"][0], "FAIL")
        self.assertIn("HTTPS_PROXY must be an http:// proxy URL", said["proxy"][1])
        self.assertIn("3 of 9 checks failed.", out)

        self.environ = {"SHELL": "/bin/sh"}
        status, out = await self.cli("doctor", "--relay", self.relay.context.public_url)
        said = {step: (mark, text) for mark, step, text in lines(out)}
        self.assertEqual(said["tls"][0], "FAIL")
        self.assertIn(f"compare its fingerprint, SHA-256 {self.relay.fingerprint}", said["tls"][1])

        await self.pair()
        await self.browser.request(b"POST", "/api/revoke", {"peer": 1})
        status, out = await self.cli("doctor")
        said = {step: (mark, text) for mark, step, text in lines(out)}
        self.assertEqual(said["token"][0], "FAIL")
        self.assertIn("revoked", said["token"][1])
        self.assertEqual(said["clock"][0], "ok")


class ClockTests(SynchronousTestCase):
    """The clock check, against the relay's Date header."""

    def check(self, ours: float, date: str) -> str:
        clock = Clock()
        clock.advance(ours)
        doctor = Doctor(clock, FilePath("/nowhere"), {}, io.StringIO())
        doctor.answer = RelayAnswer(200, {}, Headers({b"date": [date.encode()]}))
        result = doctor.check_clock()
        try:
            result.send(None)
        except StopIteration as done:
            return str(done.value)
        raise AssertionError("the check waited on something")

    def test_skew(self) -> None:
        """Within 2 s it is fine; minutes off fails, saying which way and what to do."""
        relay_time = "Thu, 01 Jan 2026 00:00:00 GMT"
        midnight = 1767225600.0
        self.assertEqual(self.check(midnight + 0.5, relay_time), "within 2 s of the relay's")
        self.assertEqual(self.check(midnight - 40, relay_time), "40 s behind the relay's")
        error = self.assertRaises(Failed, self.check, midnight + 900, relay_time)
        self.assertIn("900 s ahead of the relay's: set it right", str(error))
