"""
The page's resume, acknowledgement and input-retention logic
(C{coder1_relay/static/streams.js}, docs/protocol.md section 5.7), and the bounds on
every number it takes from the relay (C{bounds.js}), unit-tested in Node by the
scripts in C{tests/js}.
"""

from __future__ import annotations

import os
import shutil

from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SkipTest, TestCase

from .loopback import reactor

NODE = shutil.which("node")
SCRIPTS = FilePath(__file__).sibling("js")


class PageStreamsTests(TestCase):
    """The page's modules in Node: every case of each script in tests/js passes."""

    timeout = 60

    def setUp(self) -> None:
        if NODE is None:
            if os.environ.get("CI"):
                self.fail("the page's stream tests must run in CI: node is not installed")
            raise SkipTest("needs Node.js (node) to run the page's streams.js")

    async def run_script(self, name: str, cases: int) -> None:
        """Run C{tests/js/name}: at least C{cases} cases print "ok", none "FAIL"."""
        assert NODE is not None
        script = SCRIPTS.child(name)
        out, err, code = await getProcessOutputAndValue(
            NODE, [script.path], env=dict(os.environ), path=script.dirname(), reactor=reactor
        )
        report = (out + err).decode(errors="replace")
        self.assertEqual(code, 0, report)
        lines = out.decode().splitlines()
        self.assertNotIn("FAIL", report)
        passed = [line for line in lines if line.startswith("ok ")]
        self.assertGreaterEqual(len(passed), cases, report)
        self.assertEqual(lines[-1], f"{len(passed)} passed, 0 failed")

    async def test_streams(self) -> None:
        """
        Output positions (duplicates dropped after a resume, a straddling frame cut, GAP),
        acknowledgements (at half the window, else after 100 ms, one ACK for all streams),
        input numbering, resending from RESUMED's next, INPUT_ACK trimming, and the bounds
        on what waits and what is kept.
        """
        await self.run_script("streams_test.mjs", 15)

    async def test_bounds(self) -> None:
        """
        Every number the page takes from the relay is kept in range: a WELCOME's heartbeat
        (5 to 30 s: 1e-6 cannot make it spin, 1e308 cannot stop its watchdog, a non-number
        changes nothing), a RESUMED's window, Retry-After, a code's lifetime, a listed
        terminal's size.
        """
        await self.run_script("bounds_test.mjs", 7)

    async def test_reconnect(self) -> None:
        """
        After a 1001 (the relay is going away) or 4012 close the page tries again in 0.1
        to 1 s, and keeps doing so for 20 s, uncounted; any other close gets the backoff
        as before.
        """
        await self.run_script("reconnect_test.mjs", 4)
