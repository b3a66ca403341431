"""
Tests for the command line: C{coder1-bridge pair/status/unpair/start} against
a real relay, the root refusal, and both twistd plugins run as real processes.
"""

from __future__ import annotations

import io
import os
import re
import signal
import stat
import sys
from typing import Any

from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase

from coder1_bridge import cli
from coder1_bridge.config import BridgeConfig, NotRootError, config_dir, refuse_root
from coder1_wire.e2e import Identity, b64u, sas, unb64u

from .loopback import Browser, reactor, relay_address, settle, start_relay, stop_all

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
BRIDGE_SCRIPT = os.path.join(os.path.dirname(sys.executable), "coder1-bridge")


class RootTests(SynchronousTestCase):
    """The bridge never runs as root."""

    def test_refuses_uid_zero(self) -> None:
        """Effective uid 0 is refused with a message that says what to do."""
        error = self.assertRaises(NotRootError, refuse_root, 0)
        self.assertIn("refuses to run as root", str(error))
        refuse_root(1000)


class CLITests(TestCase):
    """pair, status and unpair against a real relay over TLS."""

    timeout = 60

    def setUp(self) -> Deferred[None]:  # type: ignore[override]  # trial waits on it
        return Deferred.fromCoroutine(self.start())

    async def start(self) -> None:
        self.addCleanup(lambda: Deferred.fromCoroutine(settle()))
        self.relay = await start_relay(FilePath(self.mktemp()))
        self.addCleanup(lambda: Deferred.fromCoroutine(stop_all(self.relay)))
        self.browser = Browser(self.relay)
        await self.browser.open_page()
        self.config_dir = FilePath(self.mktemp())
        self.ca = FilePath(self.mktemp())
        self.ca.setContent(self.relay.keys.tls_cert_pem)

    async def cli(self, *argv: str, answer: str = "") -> tuple[int, str]:
        out = io.StringIO()
        code = await cli.run(
            ["--config-dir", self.config_dir.path, *argv],
            reactor=reactor,
            out=out,
            prompt=lambda _: answer,
        )
        return code, out.getvalue()

    def relay_args(self) -> list[str]:
        return ["--relay", self.relay.context.public_url, "--ca-cert", self.ca.path]

    async def test_pair_status_unpair(self) -> None:
        """Pairing saves a 0600 file; status confirms with the relay; unpair forgets."""
        code = await self.browser.new_code()
        status, out = await self.cli("pair", *self.relay_args(), "--label", "box", code)
        self.assertEqual(status, 0, out)
        self.assertIn("as bridge #1 (box)", out)
        verification = re.search(r"Verification code: (\w{4}-\w{4}-\w{4})", out)
        assert verification is not None, out
        browser = b64u(self.browser.identity.public_raw)
        _, listed, _ = await self.browser.request(b"GET", "/api/bridges")
        bridge = unb64u(listed["bridges"][0]["bridge_key"])
        self.assertEqual(verification.group(1), sas(unb64u(browser), bridge))
        saved = self.config_dir.child("pairing.json")
        self.assertEqual(stat.S_IMODE(os.stat(saved.path).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(self.config_dir.path).st_mode), 0o700)
        status, out = await self.cli("status")
        self.assertEqual(status, 0, out)
        self.assertIn("accepts this bridge's token", out)
        token = BridgeConfig.load(self.config_dir).token  # type: ignore[union-attr]
        status, out = await self.cli("unpair")
        self.assertEqual((status, saved.exists()), (0, False))
        self.assertIn("revoked this bridge's token", out)
        claims = self.relay.context.tokens.verify_bridge_token(token)
        self.assertTrue(await self.relay.context.store.is_revoked(claims.jti, 0))
        status, out = await self.cli("status")
        self.assertEqual(status, 1)
        self.assertIn("Not paired", out)

    async def test_prompts_for_code(self) -> None:
        """Without a code argument, pair asks for it (and tolerates spaces and dashes)."""
        code = await self.browser.new_code()
        status, out = await self.cli("pair", *self.relay_args(), answer=f" {code[:3]}-{code[3:]} ")
        self.assertEqual(status, 0, out)

    async def test_wrong_code(self) -> None:
        """A wrong code is refused with the relay's message and nothing is saved."""
        status, out = await self.cli("pair", *self.relay_args(), "000000")
        self.assertEqual(status, 1)
        self.assertIn("unknown, used or expired", out)
        self.assertFalse(self.config_dir.child("pairing.json").exists())

    async def test_untrusted_relay(self) -> None:
        """Without the dev certificate as trust root, the relay's certificate is refused."""
        code = await self.browser.new_code()
        status, out = await self.cli("pair", "--relay", self.relay.context.public_url, code)
        self.assertEqual(status, 1)
        self.assertIn("certificate verify failed", out)

    async def test_status_after_revoke(self) -> None:
        """status reports a revoked token as refused, with the reason."""
        await self.cli("pair", *self.relay_args(), await self.browser.new_code())
        await self.browser.request(b"POST", "/api/revoke", {"peer": 1})
        status, out = await self.cli("status")
        self.assertEqual(status, 3)
        self.assertIn("revoked", out)

    async def test_start_refused_token(self) -> None:
        """start with a revoked token stops and says to pair again."""
        await self.cli("pair", *self.relay_args(), await self.browser.new_code())
        await self.browser.request(b"POST", "/api/revoke", {"peer": 1})
        status, out = await self.cli("start")
        self.assertEqual(status, 3)
        self.assertIn("Pair again", out)

    async def test_bad_relay_url(self) -> None:
        """A non-https relay URL is refused before anything is sent."""
        status, out = await self.cli("pair", "--relay", "http://localhost:1", "123456")
        self.assertEqual(status, 1)
        self.assertIn("https://", out)

    async def test_insecure_config_refused(self) -> None:
        """A pairing file others can read is refused with a message, not used."""
        await self.cli("pair", *self.relay_args(), await self.browser.new_code())
        self.config_dir.child("pairing.json").chmod(0o644)
        status, out = await self.cli("status")
        self.assertEqual(status, 1)
        self.assertIn("pairing.json", out)

    def test_relative_xdg_ignored(self) -> None:
        """A relative XDG_CONFIG_HOME is ignored, as the XDG spec says."""
        self.assertEqual(
            config_dir({"XDG_CONFIG_HOME": "rel"}).path,
            os.path.join(os.path.expanduser("~"), ".config", "coder1-bridge"),
        )
        self.assertEqual(config_dir({"XDG_CONFIG_HOME": "/x"}).path, "/x/coder1-bridge")

    def test_config_roundtrip(self) -> None:
        """A saved pairing loads back identical, identity key included, all files 0600."""
        browser = b64u(Identity.generate().public_raw)
        config = BridgeConfig(relay_address(self.relay), "tok", 4, browser, Identity.generate())
        config.save(self.config_dir)
        loaded = BridgeConfig.load(self.config_dir)
        assert loaded is not None
        self.assertEqual(loaded, config)
        self.assertEqual(loaded.identity.public_raw, config.identity.public_raw)
        self.assertEqual(loaded.verification, config.verification)
        for name in ("pairing.json", "identity.pem"):
            self.assertEqual(self.config_dir.child(name).getPermissions().shorthand(), "rw-------")


class Collect(protocol.ProcessProtocol):
    """Collects a process's output; calls back on a regex match and at exit."""

    def __init__(self, pattern: str | None = None) -> None:
        self.output = b""
        self.pattern = re.compile(pattern.encode()) if pattern else None
        self.matched: Deferred[re.Match[bytes]] = Deferred()
        self.ended: Deferred[int | None] = Deferred()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self.output += data
        if self.pattern and not self.matched.called:
            match = self.pattern.search(self.output)
            if match:
                self.matched.callback(match)

    def processEnded(self, reason: Failure) -> None:
        code = 0 if reason.check(ProcessDone) else getattr(reason.value, "exitCode", None)
        self.ended.callback(code)
        if self.pattern and not self.matched.called:
            self.matched.errback(AssertionError(self.output.decode(errors="replace")))


def spawn(proto: Collect, argv: list[str], env: dict[str, str] | None = None) -> Any:
    # The code under test, even when an older copy is installed in site-packages.
    source = FilePath(__file__).parent().parent().path
    environ = {**os.environ, "PYTHONPATH": source, **(env or {})}
    return reactor.spawnProcess(proto, argv[0], argv, env=environ, path=os.getcwd())


class TwistdTests(TestCase):
    """Both services run under twistd, from their plugins."""

    timeout = 60

    async def test_plugins_listed(self) -> None:
        """twistd --help lists coder1-relay and coder1-bridge."""
        proto = Collect()
        spawn(proto, [TWISTD, "--help"])
        await proto.ended
        self.assertIn(b"coder1-relay", proto.output)
        self.assertIn(b"coder1-bridge", proto.output)

    async def test_relay_starts_with_defaults(self) -> None:
        """twistd -n coder1-relay prints its URL and certificate fingerprint, makes 0600 keys."""
        state = FilePath(self.mktemp())
        proto = Collect(
            r"coder1 relay at (https://localhost:\d+) \(certificate SHA-256 ([0-9A-F:]{95})\)"
        )
        process = spawn(
            proto,
            [
                TWISTD,
                "-n",
                "--pidfile=",
                "coder1-relay",
                "--listen",
                "tcp:0:interface=127.0.0.1",
                "--state-dir",
                state.path,
            ],
        )
        try:
            match = await proto.matched
        finally:
            if process.pid:
                process.signalProcess(signal.SIGTERM)
        await proto.ended
        self.assertTrue(match.group(1).startswith(b"https://localhost:"))
        for name in ("signing-key.pem", "dev-key.pem", "revocations.json"):
            if state.child(name).exists():
                self.assertEqual(state.child(name).getPermissions().shorthand(), "rw-------")
        self.assertTrue(state.child("signing-key.pem").exists())

    async def test_bridge_refuses_root(self) -> None:
        """Run as root, coder1-bridge and twistd coder1-bridge exit with the refusal message."""
        if os.geteuid() != 0:
            raise self.skipTest("only meaningful as root; RootTests covers the check itself")
        for argv in ([BRIDGE_SCRIPT, "status"], [TWISTD, "-n", "--pidfile=", "coder1-bridge"]):
            proto = Collect()
            spawn(proto, argv, {"XDG_CONFIG_HOME": self.mktemp()})
            code = await proto.ended
            self.assertNotEqual(code, 0)
            self.assertIn(b"refuses to run as root", proto.output, argv)
