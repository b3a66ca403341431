"""
End to end on loopback: a real relay, a real bridge, a scripted browser, real
processes, real TLS 1.3 and WebSockets.
"""

from __future__ import annotations

import io
import secrets
from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from coder1_wire import closecodes
from coder1_wire.envelope import Envelope, Kind, control
from coder1_wire.log_format import event_as_json

from .logs import capture_logs
from .loopback import (
    Browser,
    IDEConnection,
    crash_relay,
    pair_bridge,
    settle,
    start_bridge,
    start_relay,
    stop_all,
)


class LoopbackTestCase(TestCase):
    """Starts a relay, a paired bridge and a browser with an open IDE connection."""

    timeout = 120

    async def start(self, **bridge: Any) -> None:
        self.addCleanup(lambda: Deferred.fromCoroutine(settle()))
        self.state = FilePath(self.mktemp())
        self.relay = await start_relay(self.state)
        self.addCleanup(lambda: Deferred.fromCoroutine(stop_all(self.relay)))
        self.browser = Browser(self.relay)
        await self.browser.open_page()
        self.config_dir = FilePath(self.mktemp())
        self.config = await pair_bridge(self.browser, self.config_dir, io.StringIO())
        self.bridge = await start_bridge(self.config, label="test-host", **bridge)
        self.addCleanup(lambda: Deferred.fromCoroutine(stop_all(self.bridge)))
        self.ide = await self.connect_ide(self.browser)
        await self.ide.wait_for(lambda e: e.kind == Kind.PRESENCE and bool(e.json()["bridges"]))

    async def connect_ide(self, browser: Browser) -> IDEConnection:
        ide = await browser.connect_ide()
        self.addCleanup(ide.close)
        return ide


class CommandTests(LoopbackTestCase):
    """Commands run on the bridge's machine and their output arrives intact."""

    async def test_stdout_stderr_exit(self) -> None:
        """stdout and stderr arrive separately, byte for byte, then the exit code."""
        await self.start()
        result = await self.ide.run(
            1, {"shell": "printf 'out\\n'; printf 'err\\n' >&2; printf 'é\\377\\000' ; exit 3"}
        )
        self.assertEqual(result.stdout, b"out\n" + "é".encode() + b"\xff\x00")
        self.assertEqual(result.stderr, b"err\n")
        self.assertEqual(result.end.kind, Kind.CMD_EXIT)
        self.assertEqual((result.exit["exit_code"], result.exit["reason"]), (3, "exited"))

    async def test_argv_stdin_env_cwd(self) -> None:
        """argv commands get their stdin, environment and working directory."""
        await self.start()
        workdir = FilePath(self.mktemp())
        workdir.makedirs()
        result = await self.ide.run(
            2,
            {
                "argv": ["sh", "-c", 'cat; echo "$GREETING"; pwd'],
                "cwd": workdir.path,
                "env": {"GREETING": "hi"},
                "stdin": True,
            },
            stdin=b"from stdin\n",
        )
        self.assertEqual(result.stdout, f"from stdin\nhi\n{workdir.realpath().path}\n".encode())

    async def test_ten_megabytes(self) -> None:
        """10 MB of binary output arrives complete and in order."""
        await self.start()
        script = "import os,sys; sys.stdout.buffer.write(os.urandom(10*1024*1024))"
        result = await self.ide.run(3, {"argv": ["python3", "-c", script]})
        self.assertEqual(len(result.stdout), 10 * 1024 * 1024)
        seqs = [e.seq for e in result.frames if e.kind != Kind.PRESENCE]
        self.assertEqual(seqs, sorted(seqs))
        self.assertEqual(result.exit["exit_code"], 0)

    async def test_concurrent_commands(self) -> None:
        """Several commands run at once and each output lands on its own stream."""
        await self.start()
        runs = [
            Deferred.fromCoroutine(
                self.ide.run(10 + i, {"argv": ["sh", "-c", f"sleep 0.2; echo {i}"]})
            )
            for i in range(5)
        ]
        results = await DeferredList(runs, fireOnOneErrback=True)
        self.assertEqual([r[1].stdout for r in results], [f"{i}\n".encode() for i in range(5)])

    async def test_cancel(self) -> None:
        """Cancel ends a running command and says so."""
        await self.start()
        self.ide.send(control(Kind.CMD_START, {"argv": ["sleep", "60"]}, stream=7, peer=1))
        self.ide.send(Envelope(Kind.CMD_CANCEL, stream=7, seq=1, peer=1))
        end = await self.ide.wait_for(lambda e: e.stream == 7 and e.kind == Kind.CMD_EXIT)
        self.assertEqual(end.json()["reason"], "cancelled")

    async def test_bad_request_is_an_error_not_a_crash(self) -> None:
        """A malformed command request gets CMD_ERROR and the bridge keeps working."""
        await self.start()
        self.ide.send(Envelope(Kind.CMD_START, stream=5, peer=1, payload=b"{not json"))
        error = await self.ide.wait_for(lambda e: e.stream == 5 and e.kind == Kind.CMD_ERROR)
        self.assertIn("error", error.json())
        result = await self.ide.run(6, {"argv": ["echo", "still here"]})
        self.assertEqual(result.stdout, b"still here\n")


class RoutingTests(LoopbackTestCase):
    """Frames reach only the session they belong to."""

    async def test_other_session_cannot_reach_bridge(self) -> None:
        """Another browser session addressing this bridge's number gets an error, nothing runs."""
        await self.start()
        intruder = Browser(self.relay)
        await intruder.open_page()
        other = await self.connect_ide(intruder)
        marker = FilePath(self.mktemp())
        result = await other.run(1, {"argv": ["touch", marker.path]})
        self.assertEqual(result.end.kind, Kind.ERROR)
        self.assertEqual(result.end.json()["error"], "bridge-offline")
        self.assertFalse(marker.exists())
        status, body, _ = await intruder.request(b"GET", "/api/bridges")
        self.assertEqual((status, body["bridges"]), (200, []))

    async def test_output_goes_to_own_session_only(self) -> None:
        """A second session with its own bridge never sees the first session's output."""
        await self.start()
        other_browser = Browser(self.relay)
        await other_browser.open_page()
        other_config = await pair_bridge(other_browser, FilePath(self.mktemp()), io.StringIO())
        other_bridge = await start_bridge(other_config)
        self.addCleanup(lambda: Deferred.fromCoroutine(stop_all(other_bridge)))
        other_ide = await self.connect_ide(other_browser)
        mine = await self.ide.run(1, {"argv": ["echo", "mine"]})
        theirs = await other_ide.run(1, {"argv": ["echo", "theirs"]})
        self.assertEqual((mine.stdout, theirs.stdout), (b"mine\n", b"theirs\n"))
        self.assertNotIn(b"mine\n", [e.payload for e in other_ide.frames])

    async def test_malformed_frame_closes_only_that_connection(self) -> None:
        """A bad envelope closes its own connection with 4000; other sessions keep working."""
        await self.start()
        rogue_browser = Browser(self.relay)
        await rogue_browser.open_page()
        rogue = await self.connect_ide(rogue_browser)
        assert rogue.protocol is not None
        rogue.protocol.sendMessage(b"\x09" + b"\x00" * 30, isBinary=True)
        await rogue.lost
        self.assertEqual(rogue.close_code, closecodes.PROTOCOL_ERROR)
        result = await self.ide.run(1, {"argv": ["echo", "fine"]})
        self.assertEqual(result.stdout, b"fine\n")

    async def test_wrong_direction_and_text_frames(self) -> None:
        """A browser sending bridge-bound kinds, or text frames, is closed with a reason."""
        await self.start()
        for bad in (
            lambda ide: ide.protocol.sendMessage(
                Envelope(Kind.CMD_STDOUT, peer=1).encode(), isBinary=True
            ),
            lambda ide: ide.protocol.sendMessage(b"hello", isBinary=False),
        ):
            ide = await self.connect_ide(self.browser)
            bad(ide)
            await ide.lost
            self.assertEqual(ide.close_code, closecodes.PROTOCOL_ERROR)

    async def test_oversize_message(self) -> None:
        """A message over the limit closes that connection with 1009."""
        await self.start()
        ide = await self.connect_ide(self.browser)
        assert ide.protocol is not None
        frame = Envelope(Kind.CMD_STDIN, stream=1, peer=1, payload=b"x" * (2 * 1024 * 1024))
        ide.protocol.sendMessage(frame.encode(), isBinary=True)
        await ide.lost
        self.assertEqual(ide.close_code, 1009)

    async def test_no_delay_on_the_bridge_socket(self) -> None:
        """The bridge's socket to the relay sends small frames at once (TCP_NODELAY)."""
        await self.start()
        assert self.bridge.protocol is not None
        tls: Any = self.bridge.protocol.transport
        tcp: Any = tls.transport  # TLS over TCP
        self.assertTrue(tcp.getTcpNoDelay())

    async def test_presence(self) -> None:
        """The browser is told the bridge's number, label and version, and when it leaves."""
        await self.start()
        presence = [e for e in self.ide.frames if e.kind == Kind.PRESENCE][-1].json()["bridges"]
        self.assertEqual([(b["peer"], b["label"]) for b in presence], [(1, "test-host")])
        await self.bridge.stopService()
        await self.ide.wait_for(lambda e: e.kind == Kind.PRESENCE and e.json()["bridges"] == [])


class ReconnectTests(LoopbackTestCase):
    """The bridge reconnects by itself, with the same token."""

    async def test_relay_restart(self) -> None:
        """Kill the relay, start it again on the same port: the bridge comes back unaided."""
        await self.start(max_delay=1.0)
        port = self.relay.port.getHost().port  # type: ignore[union-attr]
        before = self.bridge.protocol
        assert before is not None
        await crash_relay(self.relay)
        await before.is_closed
        self.relay = await start_relay(self.state, listen=f"tcp:{port}:interface=127.0.0.1")
        self.assertIsNot(await self.bridge.when_connected(), before)
        self.browser.relay = self.relay
        ide = await self.connect_ide(self.browser)
        result = await ide.run(1, {"argv": ["echo", "back"]})
        self.assertEqual(result.stdout, b"back\n")

    async def test_revoked_bridge_stops(self) -> None:
        """Revoking a bridge disconnects it at once and it stops, saying why."""
        await self.start()
        status, _, _ = await self.browser.request(b"POST", "/api/revoke", {"peer": 1})
        self.assertEqual(status, 200)
        reason = await self.bridge.refused
        self.assertIn("revoked", reason)
        status, body, _ = await self.browser.request(b"GET", "/api/bridges")
        self.assertEqual(body["bridges"], [])


class CanaryTests(LoopbackTestCase):
    """The relay keeps no trace of what it forwards."""

    async def test_no_trace_of_content(self) -> None:
        """
        A marker printed by a command is nowhere in logs (as text or JSON lines),
        telemetry or the state dir; neither the bridge token nor the session cookie is in the logs.
        """
        events = capture_logs(self)
        await self.start()
        marker = "CANARY-" + secrets.token_hex(8)
        result = await self.ide.run(
            1, {"shell": f"echo {marker}; echo {marker} >&2; ls /nonexistent-{marker}"}
        )
        self.assertIn(marker.encode(), result.stdout)
        # Bad input mentioning the marker, so error paths are checked too.
        self.ide.send(Envelope(Kind.CMD_START, stream=2, peer=1, payload=marker.encode()))
        await self.ide.wait_for(lambda e: e.stream == 2 and e.kind == Kind.CMD_ERROR)
        await stop_all(self.bridge)
        await self.ide.close()
        await stop_all(self.relay)
        from twisted.logger import formatEvent

        # Both log formats: the text one and --log-format json.
        logged = "\n".join(formatEvent(e) + repr(e) + event_as_json(e) for e in events)
        self.assertNotIn(marker, logged)
        # Credentials are no content, but they must not reach the logs either.
        self.assertNotIn(self.config.token, logged)
        for cookie in self.browser.cookies:
            assert cookie.value is not None
            self.assertNotIn(cookie.value, logged)
        for path in self.state.walk():
            if path.isfile():
                self.assertNotIn(marker.encode(), path.getContent(), path.path)
        self.assertGreater(len(events), 0)


class TelemetryOptOutTests(LoopbackTestCase):
    """CODER1_TELEMETRY=false: the relay does not count the bridge's sessions."""

    async def test_opted_out_bridge_not_counted(self) -> None:
        """With telemetry off, the bridge connection and its commands are not counted."""
        await self.start(telemetry=False)
        await self.ide.run(1, {"argv": ["true"]})
        snapshot = self.relay.telemetry.snapshot()
        self.assertEqual(snapshot["open_connections"], {"bridge": 0, "ide": 1})
        self.assertEqual(_counter(snapshot, "command_started"), 0)
        self.assertEqual(_counter(snapshot, "bridge_version"), 0)

    async def test_counted_when_on(self) -> None:
        """With telemetry on, the connection, the version and the command are counted."""
        await self.start(telemetry=True)
        await self.ide.run(1, {"argv": ["true"]})
        snapshot = self.relay.telemetry.snapshot()
        self.assertEqual(snapshot["open_connections"], {"bridge": 1, "ide": 1})
        self.assertEqual(_counter(snapshot, "command_started"), 1)
        self.assertEqual(_counter(snapshot, "command_completed"), 1)
        self.assertEqual(_counter(snapshot, "bridge_version"), 1)


def _counter(snapshot: dict[str, Any], name: str) -> int:
    pending: list[dict[str, Any]] = snapshot["pending"]["counts"]
    written: list[dict[str, Any]] = snapshot["counts"]
    return sum(int(row["value"]) for row in [*pending, *written] if row["name"] == name)
