"""
Tests for the command line: C{coder1-bridge pair/status/unpair/start} against
a real relay, in process and as the real program in a pseudo-terminal where a
test types as a person does; the root refusal; both twistd plugins run as
real processes.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import stat
import sys
from typing import Any

import attrs
from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from coder1_bridge import cli, tap
from coder1_bridge.config import (
    BridgeConfig,
    NotRootError,
    RelayAddress,
    config_dir,
    refuse_root,
)
from coder1_bridge.service import BridgeService
from coder1_relay.certs import server_ssl_context
from coder1_relay.service import home_relative
from coder1_relay.tls_server import TLSServerFactory
from coder1_wire.e2e import Identity, b64u, sas, unb64u
from coder1_wire.envelope import Kind, control

from .loopback import (
    IDEConnection,
    RelayAndPage,
    reactor,
    relay_address,
    start_relay,
    stop_all,
)

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
BRIDGE_SCRIPT = os.path.join(os.path.dirname(sys.executable), "coder1-bridge")


class RootTests(SynchronousTestCase):
    """The bridge never runs as root."""

    def test_refuses_uid_zero(self) -> None:
        """Effective uid 0 is refused with a message that says what to do."""
        error = self.assertRaises(NotRootError, refuse_root, 0)
        self.assertIn("refuses to run as root", str(error))
        refuse_root(1000)


class _Answers(Resource):
    """A relay that answers each API path with the JSON it is given, and records the calls."""

    isLeaf = True

    def __init__(self, answers: dict[str, bytes]) -> None:
        super().__init__()
        self.answers = answers
        self.calls: list[tuple[bytes, bytes]] = []

    def render(self, request: Request) -> bytes:
        self.calls.append((request.method, request.path))
        request.setHeader(b"Content-Type", b"application/json")
        return self.answers.get(request.path.decode(), b"{}")


class CLITests(RelayAndPage):
    """
    pair, status and unpair against a real relay over TLS, and against a relay
    whose answers carry numbers no bridge should take (checked: never a traceback).
    """

    async def cli(self, *argv: str, answer: str = "") -> tuple[int, str]:
        out = io.StringIO()
        code = await cli.run(
            ["--config-dir", self.config_dir.path, *argv],
            reactor=reactor,
            out=out,
            environ={},
            console=cli.Console(lambda _: answer, interactive=False),
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
        self.assertIn("not paired", out)

    async def test_prompts_for_code(self) -> None:
        """Without a code argument, pair asks for it (and tolerates spaces and dashes)."""
        code = await self.browser.new_code()
        status, out = await self.cli("pair", *self.relay_args(), answer=f" {code[:3]}-{code[3:]} ")
        self.assertEqual(status, 0, out)

    async def test_wrong_code(self) -> None:
        """A wrong code is refused with the relay's message and nothing is saved."""
        status, out = await self.cli("pair", *self.relay_args(), "000000")
        self.assertEqual(status, 1)
        self.assertIn("The relay does not know that code", out)
        self.assertFalse(self.config_dir.child("pairing.json").exists())

    async def test_untrusted_relay(self) -> None:
        """
        Without the dev certificate as trust root, the relay's certificate is refused, and
        the person is told it is self-signed, its fingerprint (to compare with the one the
        relay printed) and the option to pass: no OpenSSL words.
        """
        code = await self.browser.new_code()
        status, out = await self.cli("pair", "--relay", self.relay.context.public_url, code)
        self.assertEqual(status, 1)
        self.assertIn("self-signed", out)
        self.assertIn(f"SHA-256 {self.relay.fingerprint}", out)
        self.assertIn("--ca-cert", out)
        self.assertNotIn("SSL", out)

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

    async def test_start_logs_after_global_options(self) -> None:
        """
        C{coder1-bridge --config-dir X start}, a real process, logs what it does
        (to stderr) like C{coder1-bridge start}: options before the subcommand
        do not turn its logging off.
        """
        await self.cli("pair", *self.relay_args(), await self.browser.new_code())
        proto = Collect("Connected to localhost")
        process = spawn(proto, [BRIDGE_SCRIPT, "--config-dir", self.config_dir.path, "start"])
        try:
            await proto.matched.addTimeout(30, reactor)
        finally:
            if process.pid:
                process.signalProcess(signal.SIGTERM)
            await proto.ended

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

    async def fake_relay(self, answers: dict[str, bytes]) -> tuple[_Answers, list[str]]:
        """A relay on the real one's certificate that answers C{answers}; its CLI arguments."""
        resource = _Answers(answers)
        endpoint = serverFromString(reactor, "tcp:0:interface=127.0.0.1")
        context = server_ssl_context(self.relay.keys)
        port = await endpoint.listen(TLSServerFactory(lambda: context, Site(resource)))
        self.addCleanup(port.stopListening)
        url = f"https://localhost:{port.getHost().port}"
        return resource, ["--relay", url, "--ca-cert", self.ca.path]

    async def test_bad_bridge_number_refused(self) -> None:
        """A pairing answer whose peer is not a u32 (1e308, 2^32, true) saves nothing; the
        token it came with is revoked."""
        key = b64u(Identity.generate().public_raw).encode()
        for peer in (b"1e308", b"4294967296", b"true", b'"1"', b"0"):
            answer = b'{"token":"t","peer":%s,"expires_at":1,"browser_key":"%s"}' % (peer, key)
            resource, args = await self.fake_relay({"/api/pair": answer})
            status, out = await self.cli("pair", *args, "123456")
            self.assertEqual(status, 1, out)
            self.assertIn("no usable bridge number; nothing was saved", out)
            self.assertIn((b"DELETE", b"/api/token"), resource.calls)
            self.assertFalse(self.config_dir.child("pairing.json").exists())

    async def test_unshowable_expiry(self) -> None:
        """An expiry no calendar shows (1e308, Infinity, NaN, text) is said to be unknown."""
        key = b64u(Identity.generate().public_raw).encode()
        for expires in (b"1e308", b"Infinity", b"-Infinity", b"NaN", b'"soon"', b"-1"):
            self.config_dir.remove() if self.config_dir.exists() else None
            answers = {
                "/api/pair": b'{"token":"t","peer":1,"expires_at":%s,"browser_key":"%s"}'
                % (expires, key),
                "/api/pair/key": b'{"peer":1}',
                "/api/token": b'{"valid":true,"peer":1,"expires_at":%s}' % expires,
            }
            _, args = await self.fake_relay(answers)
            status, out = await self.cli("pair", *args, "123456")
            self.assertEqual(status, 0, out)
            self.assertIn("valid until an unknown date", out)
            status, out = await self.cli("status")
            self.assertEqual(status, 0, out)
            self.assertIn("valid until an unknown date", out)

    async def test_repair_revokes_the_old_pairing(self) -> None:
        """
        Pairing again while paired revokes the old token first: the relay refuses it, the
        IDE lists only the new bridge, and C{pair} says what it revoked.
        """
        await self.cli("pair", *self.relay_args(), await self.browser.new_code())
        old = BridgeConfig.load(self.config_dir)
        assert old is not None
        status, out = await self.cli("pair", *self.relay_args(), await self.browser.new_code())
        self.assertEqual(status, 0, out)
        self.assertIn(f"Revoked the previous pairing (bridge #{old.peer} at", out)
        claims = self.relay.context.tokens.verify_bridge_token(old.token)
        self.assertTrue(await self.relay.context.store.is_revoked(claims.jti, 0))
        _, listed, _ = await self.browser.request(b"GET", "/api/bridges")
        new = BridgeConfig.load(self.config_dir)
        assert new is not None
        self.assertEqual([b["peer"] for b in listed["bridges"]], [new.peer])

    async def test_unreachable_relays_are_explained(self) -> None:
        """
        Each way of not reaching the relay is said with what to try, in words a person
        knows: nothing listening at the port, a name that does not resolve, a certificate
        for other names, a certificate other than the one trusted, and a server that does
        not speak TLS.  No exception class or OpenSSL words.
        """
        code = await self.browser.new_code()
        other = await start_relay(FilePath(self.mktemp()), hostnames=("localhost",))
        self.addCleanup(lambda: Deferred.fromCoroutine(stop_all(other)))
        other_ca = FilePath(self.mktemp())
        other_ca.setContent(other.keys.tls_cert_pem)
        other_port = other.port.getHost().port  # type: ignore[union-attr]
        plain = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
            Factory.forProtocol(_NotTLS)
        )
        self.addCleanup(plain.stopListening)
        closed = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(Factory())
        closed_port = closed.getHost().port
        await closed.stopListening()
        cases = [
            (
                ["--relay", f"https://localhost:{closed_port}"],
                f"Nothing accepts connections at localhost:{closed_port}: is the relay running",
            ),
            (
                ["--relay", "https://no-such-relay.invalid"],
                "The name no-such-relay.invalid cannot be found (DNS)",
            ),
            (
                ["--relay", f"https://127.0.0.1:{other_port}", "--ca-cert", other_ca.path],
                "The relay's certificate is not for 127.0.0.1 (it is for localhost)",
            ),
            (
                ["--relay", self.relay.context.public_url, "--ca-cert", other_ca.path],
                "The relay's certificate is not the one this bridge trusts (the relay's: "
                f"SHA-256 {self.relay.fingerprint})",
            ),
            (
                ["--relay", f"https://localhost:{plain.getHost().port}"],
                "but not with TLS: is that the relay's HTTPS port",
            ),
        ]
        for args, said in cases:
            status, out = await self.cli("pair", *args, code)
            self.assertEqual(status, 1, out)
            self.assertIn(said, out)
            for leak in ("Error", "SSL", "routines", "Exception"):
                self.assertNotIn(leak, out)

    async def test_rate_limited_pairing_says_how_long_and_why(self) -> None:
        """
        After 10 wrong codes from this address the relay refuses even a good one for an
        hour: C{pair} says for how long and why, and that nothing was paired.
        """
        for _ in range(10):
            status, _, _ = await self.browser.request(
                b"POST", "/api/pair", {"code": "000000", "label": "x"}
            )
            self.assertEqual(status, 403)
        status, out = await self.cli("pair", *self.relay_args(), await self.browser.new_code())
        self.assertEqual(status, 1)
        self.assertIn(
            "The relay refuses pairing attempts from this address for the next 60 minutes: too "
            "many wrong codes were tried from it (it allows 10 an hour",
            out,
        )
        self.assertIn("Nothing was paired", out)


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
        """
        twistd -n coder1-relay prints its URL, its certificate's fingerprint and the option
        bridges trust it with, and makes 0600 keys; its log names no object by its address
        (no "Starting factory <...RelaySite object at 0x...>").
        """
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
        shown = home_relative(state.child("dev-cert.pem").path)
        trust = f"; bridges trust it with --ca-cert {shown}"
        self.assertIn(trust.encode(), proto.output)
        self.assertNotIn(b" object at 0x", proto.output)
        for name in ("signing-key.pem", "dev-key.pem", "revocations.json"):
            if state.child(name).exists():
                self.assertEqual(state.child(name).getPermissions().shorthand(), "rw-------")
        self.assertTrue(state.child("signing-key.pem").exists())

    async def test_bridge_daemon_keeps_its_files_in_the_state_dir(self) -> None:
        """
        C{twistd coder1-bridge}, daemonized without --pidfile or --logfile, writes its pid
        file and log to C{$XDG_STATE_HOME/coder1-bridge}, nothing to the current directory,
        and logs there in full; TERM stops it and removes the pid file.
        """
        home = FilePath(self.mktemp())
        cwd = home.child("cwd")
        cwd.makedirs()
        browser = b64u(Identity.generate().public_raw)
        BridgeConfig(
            RelayAddress("https://localhost:1"), "tok", 1, browser, Identity.generate(), "box"
        ).save(home.descendant(["config", "coder1-bridge"]))
        env = {
            **os.environ,
            "PYTHONPATH": FilePath(__file__).parent().parent().path,
            "HOME": home.path,
            "XDG_CONFIG_HOME": home.child("config").path,
            "XDG_STATE_HOME": home.child("state").path,
        }
        proto = Collect()
        reactor.spawnProcess(proto, TWISTD, [TWISTD, "coder1-bridge"], env=env, path=cwd.path)
        self.assertEqual(await proto.ended, 0, proto.output)
        state = home.descendant(["state", "coder1-bridge"])
        pidfile, log = state.child("bridge.pid"), state.child("bridge.log")
        self.addCleanup(_stop_daemon, pidfile)
        # After a retry is scheduled: its explanation is what the log must keep.
        while not (os.path.exists(pidfile.path) and b"retrying in" in _read(log)):
            await deferLater(reactor, 0.05)
        self.assertEqual(cwd.listdir(), [])
        self.assertEqual(state.getPermissions().shorthand(), "rwx------")
        os.kill(int(pidfile.getContent()), signal.SIGTERM)
        while os.path.exists(pidfile.path):  # FilePath.exists() would trust its cached stat
            await deferLater(reactor, 0.05)
        self.assertIn(b"Nothing accepts connections at localhost:1", log.getContent())

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


class _NotTLS(protocol.Protocol):
    """A server that answers whatever comes in plain HTTP, as a web server's port 80 does."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]


class Typist(Collect):
    """
    The real C{coder1-bridge} in a pseudo-terminal: what it shows, waits for what it will
    show, and keys typed into it as a person types them (Ctrl-C and Ctrl-D included: the
    terminal turns them into SIGINT and the end of input).
    """

    def __init__(self) -> None:
        super().__init__()
        self._waiting: list[tuple[re.Pattern[bytes], int, Deferred[re.Match[bytes]]]] = []

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        super().childDataReceived(childFD, data)
        for waiter in list(self._waiting):
            found = waiter[0].search(self.output, waiter[1])
            if found:
                self._waiting.remove(waiter)
                waiter[2].callback(found)

    def processEnded(self, reason: Failure) -> None:
        for pattern, _, d in self._waiting:
            d.errback(AssertionError(f"ended before {pattern.pattern!r}: {self.output!r}"))
        self._waiting = []
        super().processEnded(reason)

    def shown(self, pattern: str, after: int = 0) -> Deferred[re.Match[bytes]]:
        """The first match of C{pattern} in the screen from C{after} on, shown or to come."""
        regex = re.compile(pattern.encode())
        d: Deferred[re.Match[bytes]] = Deferred()
        found = regex.search(self.output, after)
        if found:
            d.callback(found)
        elif self.ended.called:
            d.errback(AssertionError(f"ended before {pattern!r}: {self.output!r}"))
        else:
            self._waiting.append((regex, after, d))
        return d.addTimeout(30, reactor)

    def type(self, keys: str) -> None:
        self.transport.write(keys.encode())  # type: ignore[union-attr]

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace")


class TypedTests(RelayAndPage):
    """The real program in a pseudo-terminal, against a real relay, typed into as a person does."""

    timeout = 90

    async def start(self) -> None:
        await super().start()
        self.home = FilePath(self.mktemp())
        self.home.makedirs()
        self.ca = self.home.child("relay.pem")
        self.ca.setContent(self.relay.keys.tls_cert_pem)
        self.env = {
            "HOME": self.home.path,
            "XDG_CONFIG_HOME": self.home.child("config").path,
            "XDG_STATE_HOME": self.home.child("state").path,
            "SHELL": "/bin/bash",
            "TERM": "dumb",
        }
        for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
            self.env[proxy] = ""
        self.config_dir = self.home.descendant(["config", "coder1-bridge"])

    def bridge(self, *argv: str) -> Typist:
        """C{coder1-bridge argv} in a pseudo-terminal of its own, ended at cleanup."""
        typist = Typist()
        process = spawn_pty(typist, [BRIDGE_SCRIPT, *argv], self.env)
        self.addCleanup(lambda: _end(process, typist))
        return typist

    def relay_args(self) -> list[str]:
        return ["--relay", self.relay.context.public_url, "--ca-cert", self.ca.path]

    def assert_said_plainly(self, typist: Typist) -> None:
        """No traceback, exception class, object repr or log prefix reached the person."""
        for leak in ("Traceback", "Error:", "Exception", " object at 0x", "#info]", "[-]"):
            self.assertNotIn(leak, typist.text)

    async def test_start_unpaired_shows_the_prompt_then_ctrl_d(self) -> None:
        """
        C{start} on a machine not paired says so and shows its question at once (before
        anything is typed); Ctrl-D there ends it with one sentence that says what to do and
        status 1, and without the "Run the bridge with" of a pairing.
        """
        typist = self.bridge("start")
        await typist.shown(r"not paired yet.*\r?\n.*Pairing code shown in the IDE: $")
        typist.type("\x04")
        self.assertEqual(await typist.ended, 1)
        self.assertIn("No pairing code was given", typist.text)
        self.assertNotIn("Run the bridge with", typist.text)
        self.assert_said_plainly(typist)

    async def test_ctrl_c_at_the_question(self) -> None:
        """Ctrl-C while C{pair} asks for the code ends it with "Interrupted." and status 130."""
        typist = self.bridge("pair", *self.relay_args())
        await typist.shown(r"Pairing code shown in the IDE: $")
        typist.type("\x03")
        self.assertEqual(await typist.ended, 130)
        self.assertIn("Interrupted.", typist.text)
        self.assert_said_plainly(typist)

    async def test_no_input_at_all(self) -> None:
        """
        With stdin at /dev/null, C{start} unpaired and C{pair} without a code each end with
        one sentence that says to run C{coder1-bridge pair CODE}, status 1.
        """
        for argv in (["start"], ["pair", *self.relay_args()]):
            collected = Collect()
            command = " ".join([BRIDGE_SCRIPT, *argv]) + " </dev/null"
            spawn(collected, ["/bin/sh", "-c", command], self.env)
            self.assertEqual(await collected.ended, 1, collected.output)
            said = collected.output.decode()
            self.assertIn("coder1-bridge pair CODE", said)
            self.assertNotIn("Traceback", said)

    async def test_malformed_codes_are_never_sent(self) -> None:
        """
        Codes with letters or the wrong length are refused at the question, which is asked
        again, and never reach the relay (it counts no failed redemption); spaces and dashes
        are fine: the code typed last pairs.  Given as an argument, one is refused the same
        way, with status 1.
        """
        refused = self.bridge("pair", *self.relay_args(), "12a456")
        self.assertEqual(await refused.ended, 1)
        self.assertIn("“12a456” is not a pairing code", refused.text)
        code = await self.browser.new_code()
        typist = self.bridge("pair", *self.relay_args())
        shown = 0
        for typo in ("12a456", "abcdef", "12345"):
            prompt = await typist.shown(r"Pairing code shown in the IDE: $", shown)
            typist.type(typo + "\n")
            said = await typist.shown(r"is not a pairing code.*Nothing was sent", prompt.end())
            shown = said.end()
        await typist.shown(r"Pairing code shown in the IDE: $", shown)
        typist.type(f"{code[:3]} - {code[3:]}\n")
        self.assertEqual(await typist.ended, 0, typist.text)
        self.assertIn("Verification code:", typist.text)
        failures = await self.relay.context.store.count(
            "fail:ip:127.0.0.1", self.relay.context.clock.seconds(), 3600
        )
        self.assertEqual(failures, 0)

    async def test_start_pairs_then_speaks_plainly_until_ctrl_c(self) -> None:
        """
        C{start} unpaired asks for the code, pairs (without telling to run C{start}), then
        says in short lines that it connects and is connected, with the verification code,
        and that a terminal opened: no timestamps, log prefixes or object reprs.  Ctrl-C stops
        it: "Stopped.", status 0.  C{--verbose} shows the detail instead.
        """
        code = await self.browser.new_code()
        typist = self.bridge("start", *self.relay_args(), "--label", "box")
        await typist.shown(r"Pairing code shown in the IDE: $")
        typist.type(code + "\n")
        pairing = await typist.shown(r"Verification code: (\w{4}-\w{4}-\w{4})")
        verification = pairing.group(1).decode()
        connected = await typist.shown(
            rf"Connected to localhost \(verification code {verification}\)\r?\n"
        )
        ide = await self.browser.connect_ide(handshake=True)
        await open_terminal(ide, peer=1)
        await typist.shown(r"Terminal opened \(1 open\)\r?\n", connected.end())
        typist.type("\x03")
        self.assertEqual(await typist.ended, 0)
        self.assertIn("Connecting to localhost as “box”…", typist.text)
        self.assertRegex(typist.text, r"\r?\nStopped\.\r?\n")
        self.assertNotIn("Run the bridge with", typist.text)
        self.assertNotRegex(typist.text, r"\d{4}-\d\d-\d\dT\d\d:\d\d")
        self.assert_said_plainly(typist)
        await ide.close()

        verbose = self.bridge("start", "--verbose")
        await verbose.shown(r"connected to the relay")
        verbose.type("\x03")
        self.assertEqual(await verbose.ended, 0)
        self.assertRegex(verbose.text, r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\S* \[coder1_bridge\.")

    async def test_start_help_is_plain_help(self) -> None:
        """C{start --help} is argparse's help on stdout, no log lines, status 0."""
        typist = self.bridge("start", "--help")
        self.assertEqual(await typist.ended, 0)
        self.assertIn("usage: coder1-bridge start", typist.text)
        self.assertIn("--replay-buffer", typist.text)
        self.assertNotIn("[stdout#info]", typist.text)
        self.assertNotRegex(typist.text, r"\d{4}-\d\d-\d\dT\d\d:\d\d")

    async def test_unreachable_relay_is_explained_and_retried(self) -> None:
        """
        A bridge whose relay does not listen says why in a sentence with what to try, and
        when it retries; the same failure again is said in short.
        """
        config = await self.paired()
        port = self.relay.port.getHost().port  # type: ignore[union-attr]
        await stop_all(self.relay)
        typist = self.bridge("start")
        first = await typist.shown(
            rf"Nothing accepts connections at localhost:{port}: is the relay running, and is "
            r"the port in --relay right\? Retrying in \d+ s\."
        )
        await typist.shown(r"Relay still unreachable, retrying in \d+ s\.", first.end())
        typist.type("\x03")
        self.assertEqual(await typist.ended, 0)
        self.assert_said_plainly(typist)
        self.assertEqual(BridgeConfig.load(self.config_dir), config)

    async def test_refused_certificate_is_explained_and_retried(self) -> None:
        """
        A relay whose certificate is not the one the pairing trusts (a development relay
        that made a new one) is named by its fingerprint, with what to do; the bridge keeps
        trying, and says so in short after the first time.
        """
        config = await self.paired()
        stranger = await start_relay(FilePath(self.mktemp()))
        self.addCleanup(lambda: Deferred.fromCoroutine(stop_all(stranger)))
        relay = RelayAddress(config.relay.url, stranger.keys.tls_cert_pem.decode())
        attrs.evolve(config, relay=relay).save(self.config_dir)
        typist = self.bridge("start")
        first = await typist.shown(
            "The relay's certificate is not the one this bridge trusts \\(the relay's: SHA-256 "
            f"{self.relay.fingerprint}\\).*pair again with the relay's certificate: --ca-cert "
            r"FILE.* Retrying in \d+ s\."
        )
        await typist.shown(r"Relay still unreachable, retrying in \d+ s\.", first.end())
        typist.type("\x03")
        self.assertEqual(await typist.ended, 0)
        self.assert_said_plainly(typist)

    async def test_label_is_kept_for_start(self) -> None:
        """
        The label given to C{pair --label} is saved with the pairing and used by a later
        C{start} without C{--label}, as by C{twistd coder1-bridge}; C{start --label} replaces
        it for the starts after it.
        """
        await self.paired("--label", "box")
        self.assertEqual(await self.live_label(), "box")
        self.assertEqual(await self.live_label("--label", "other"), "other")
        self.assertEqual(await self.live_label(), "other")
        options = tap.Options()
        options.parseOptions(["--config-dir", self.config_dir.path])
        services: Any = tap.makeService(options)  # a MultiService without twistd
        bridge = next(s for s in services if isinstance(s, BridgeService))
        self.assertEqual(bridge.label, "other")

    async def live_label(self, *argv: str) -> str:
        """Run C{start argv} until the relay lists it, and the label the IDE is shown."""
        typist = self.bridge("start", *argv)
        await typist.shown(r"Connected to")
        _, listed, _ = await self.browser.request(b"GET", "/api/bridges")
        typist.type("\x03")
        self.assertEqual(await typist.ended, 0)
        return str(listed["bridges"][0]["label"])

    async def test_status_asks_the_running_bridge(self) -> None:
        """
        C{status} says whether a bridge runs for this pairing by asking it (its status
        socket): while C{start} runs, its pid, that it is connected, and how many terminals
        and commands it has open; a second C{start} is refused; once it stops, that none runs.
        """
        await self.paired()
        typist = self.bridge("start")
        await typist.shown(r"Connected to")
        ide = await self.browser.connect_ide(handshake=True)
        await open_terminal(ide, peer=1)
        await typist.shown(r"Terminal opened \(1 open\)")
        pid = typist.transport.pid  # type: ignore[union-attr]
        running = self.bridge("status")
        self.assertEqual(await running.ended, 0, running.text)
        self.assertIn(
            f"The bridge is running (pid {pid}) and connected to the relay since", running.text
        )
        self.assertIn("1 terminal and 0 commands open", running.text)
        second = self.bridge("start")
        self.assertEqual(await second.ended, 1)
        self.assertIn(f"A bridge is already running for this pairing (pid {pid})", second.text)
        await ide.close()
        typist.type("\x03")
        self.assertEqual(await typist.ended, 0)
        self.assertIn("Stopping: ending 1 terminals and commands…", typist.text)
        stopped = self.bridge("status")
        self.assertEqual(await stopped.ended, 0)
        self.assertIn("No bridge is running for this pairing", stopped.text)

    async def paired(self, *argv: str) -> BridgeConfig:
        """Pair the program's config dir with the relay, as C{pair} does."""
        typist = self.bridge("pair", *self.relay_args(), *argv, await self.browser.new_code())
        self.assertEqual(await typist.ended, 0, typist.text)
        config = BridgeConfig.load(self.config_dir)
        assert config is not None
        return config


async def open_terminal(ide: IDEConnection, peer: int) -> None:
    """What + Terminal does: a terminal on bridge C{peer}, once it has opened."""
    ide.send(control(Kind.PTY_OPEN, {"cols": 80, "rows": 24, "argv": ["sh"]}, stream=2, peer=peer))
    await ide.wait_for(lambda e: e.stream == 2 and e.kind == Kind.PTY_OPENED)


def _stop_daemon(pidfile: FilePath[str]) -> None:
    """Stop a daemon the test left running (it failed before stopping it)."""
    with contextlib.suppress(OSError, ValueError):
        os.kill(int(pidfile.getContent()), signal.SIGTERM)


def _read(path: FilePath[str]) -> bytes:
    return path.getContent() if os.path.exists(path.path) else b""


def spawn_pty(proto: Collect, argv: list[str], env: dict[str, str]) -> Any:
    """Like L{spawn}, with a pseudo-terminal as the program's controlling terminal."""
    source = FilePath(__file__).parent().parent().path
    environ = {**os.environ, "PYTHONPATH": source, **env}
    return reactor.spawnProcess(proto, argv[0], argv, env=environ, path=os.getcwd(), usePTY=True)


async def _end_coroutine(process: Any, collected: Collect) -> None:
    if not collected.ended.called:
        process.signalProcess("TERM")
    await collected.ended


def _end(process: Any, collected: Collect) -> Deferred[None]:
    return Deferred.fromCoroutine(_end_coroutine(process, collected))


class RunningImportsTests(SynchronousTestCase):
    def test_start_leaves_the_other_commands_out(self) -> None:
        """
        What a running bridge imports (C{coder1-bridge start}'s CLI and the bridge
        service, or twistd's tap) leaves out the modules of the other commands and
        the relay API's HTTP client (C{twisted.web}): about 1.5 MiB it would keep.
        """
        import subprocess

        others = ("pairing", "status", "doctor", "service_install", "telemetry_report")
        code = (
            "import sys, coder1_bridge.cli, coder1_bridge.tap\n"
            f"names = {['coder1_bridge.relay_api', *(f'coder1_bridge.{m}' for m in others)]!r}\n"
            "print(' '.join(sorted(m for m in sys.modules"
            " if m in names or m.startswith('twisted.web'))))\n"
        )
        found = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        self.assertEqual(found.stdout.split(), [])
