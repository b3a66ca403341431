"""
The page's resume, acknowledgement and input-retention logic
(C{coder1_relay/static/streams.js}, docs/protocol.md section 5.7), unit-tested in Node
by C{tests/js/streams_test.mjs}.
"""

from __future__ import annotations

import os
import shutil

from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SkipTest, TestCase

from .loopback import reactor

NODE = shutil.which("node")
SCRIPT = FilePath(__file__).sibling("js").child("streams_test.mjs")


class PageStreamsTests(TestCase):
    """streams.js in Node: every case of tests/js/streams_test.mjs passes."""

    timeout = 60

    def setUp(self) -> None:
        if NODE is None:
            if os.environ.get("CI"):
                self.fail("the page's stream tests must run in CI: node is not installed")
            raise SkipTest("needs Node.js (node) to run the page's streams.js")

    async def test_streams(self) -> None:
        """
        Output positions (duplicates dropped after a resume, a straddling frame cut, GAP),
        acknowledgements (at half the window, else after 100 ms, one ACK for all streams),
        input numbering, resending from RESUMED's next, INPUT_ACK trimming, and the bounds
        on what waits and what is kept: each case prints "ok", none "FAIL".
        """
        assert NODE is not None
        out, err, code = await getProcessOutputAndValue(
            NODE, [SCRIPT.path], env=dict(os.environ), path=SCRIPT.dirname(), reactor=reactor
        )
        report = (out + err).decode(errors="replace")
        self.assertEqual(code, 0, report)
        lines = out.decode().splitlines()
        self.assertNotIn("FAIL", report)
        passed = [line for line in lines if line.startswith("ok ")]
        self.assertGreaterEqual(len(passed), 15, report)
        self.assertEqual(lines[-1], f"{len(passed)} passed, 0 failed")
