"""
The whole flow in a real headless Chromium, against a real relay and a real
bridge started as C{coder1-bridge} subprocesses, the way a person does it.

Screenshots of each step land in C{_trial_temp/browser-artifacts/}.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import struct
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import Data

from coder1_relay.certs import DEV_CERT_NAME
from coder1_relay.context import SESSION_COOKIE
from coder1_relay.service import RelayService, home_relative
from coder1_relay.websocket import IDEProtocol
from coder1_wire.e2e import Identity, b64u
from coder1_wire.envelope import HEADER_SIZE, Kind, control

from .loopback import crash_relay, reactor, settle, start_relay, stop_all
from .test_cli import Collect, spawn

T = TypeVar("T")
_log = Logger()
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
BRIDGE = os.path.join(os.path.dirname(sys.executable), "coder1-bridge")
ARTIFACTS = "browser-artifacts"  # under _trial_temp: trial runs tests there


def _unavailable() -> str | None:
    if os.geteuid() == 0:
        return "the bridge refuses root; run the suite as a normal user (.ci/run does)"
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        return "needs Debian's chromium and chromium-driver (.ci/run installs them)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "needs selenium (the dev extra)"
    return None


def spki_pin(cert_pem: bytes) -> str:
    """Chromium's --ignore-certificate-errors-spki-list value: trust exactly this key."""
    key = x509.load_pem_x509_certificate(cert_pem).public_key()
    spki = key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


async def _running(cmdline: str, timeout: float = 30.0) -> None:
    """Wait until a process of this machine has the command line C{cmdline} (NUL-separated)."""
    wanted = cmdline.encode()
    deadline = reactor.seconds() + timeout
    while reactor.seconds() < deadline:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if f.read() == wanted:
                        return
            except OSError:
                continue
        await deferLater(reactor, 0.05)
    raise AssertionError(f"no process {cmdline!r} within {timeout} s")


class Page:
    """A Chromium page driven from a thread, so the reactor keeps serving it."""

    def __init__(self, driver: Any) -> None:
        self.driver = driver
        #: Every WebSocket message the page sent or received: ("Sent" or "Received", bytes).
        self.frames: list[tuple[str, bytes]] = []

    def call(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        return deferToThread(f, *args)

    def js(self, script: str, *args: Any, asynchronous: bool = False) -> Deferred[Any]:
        """Run C{script} in the page; an asynchronous one calls its last argument when done."""
        if asynchronous:
            return self.call(self.driver.execute_async_script, script, *args)
        return self.call(self.driver.execute_script, script, *args)

    async def wait(self, script: str, *args: Any, timeout: float = 30.0, what: str = "") -> Any:
        """Poll a JS expression (a function body returning a value) until it is truthy."""
        deadline = reactor.seconds() + timeout
        while True:
            value = await self.js(script, *args)
            if value:
                return value
            if reactor.seconds() > deadline:
                await self.shot("timeout")
                raise AssertionError(f"timed out waiting for {what or script}")
            await deferLater(reactor, 0.1)

    async def click(self, selector: str) -> None:
        await self.js("document.querySelector(arguments[0]).click()", selector)

    async def type(self, text: str) -> None:
        """Type into the focused terminal, key by key, as a person does."""
        from selenium.webdriver.common.action_chains import ActionChains

        def keys() -> None:
            ActionChains(self.driver).send_keys(text).perform()

        await self.call(keys)

    async def ctrl(self, key: str) -> None:
        """Press Ctrl and a key in the focused terminal."""
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.keys import Keys

        def press() -> None:
            ActionChains(self.driver).key_down(Keys.CONTROL).send_keys(key).key_up(
                Keys.CONTROL
            ).perform()

        await self.call(press)

    async def new_terminal(self) -> None:
        """Once + Terminal is enabled, click it and wait for the new terminal's shell prompt."""
        await self.wait(
            "return !document.querySelector('#new-terminal').disabled", what="+ Terminal"
        )
        await self.click("#new-terminal")
        await self.wait_screen(r"[$#] *$", "a shell prompt")

    async def wait_screen(self, pattern: str, what: str) -> str:
        """Wait until the visible terminal shows a line matching C{pattern}."""
        text: str = await self.wait(
            "const t = document.querySelector('.term-pane[aria-hidden=\"false\"] .xterm-rows');"
            "return t && new RegExp(arguments[0], 'm').test(t.innerText) && t.innerText;",
            pattern,
            what=what,
        )
        return text

    async def websocket_frames(self) -> list[tuple[str, bytes]]:
        """
        Every WebSocket message the page has sent or received so far, as Chromium's DevTools
        saw it (the performance log, drained here), with binary payloads decoded.
        """
        for entry in await self.call(self.driver.get_log, "performance"):
            event = json.loads(entry["message"])["message"]
            method = event.get("method", "")
            if method in ("Network.webSocketFrameSent", "Network.webSocketFrameReceived"):
                response = event["params"]["response"]
                data = response["payloadData"]
                # DevTools gives binary messages (opcode 2) in base64, text ones as text.
                payload = base64.b64decode(data) if response["opcode"] != 1 else data.encode()
                self.frames.append((method.removeprefix("Network.webSocketFrame"), payload))
        return self.frames

    async def shot(self, name: str) -> None:
        """A screenshot, and the browser console so far, as test artifacts."""
        artifacts = FilePath(ARTIFACTS)
        artifacts.makedirs(ignoreExistingDirectory=True)
        await self.call(self.driver.save_screenshot, artifacts.child(f"{name}.png").path)
        console = await self.call(self.driver.get_log, "browser")
        with artifacts.child("console.log").open("a") as log:
            log.writelines(f"{name}: {entry}\n".encode() for entry in console)


class BrowserTests(TestCase):
    """A person pairs their machine and uses a terminal on it, in Chromium."""

    timeout = 180

    def setUp(self) -> None:
        reason = _unavailable()
        if reason is not None:
            if os.environ.get("CI"):
                self.fail(f"the browser test must run in CI: {reason}")
            raise SkipTest(reason)

    async def start_browser(self, pin: str) -> Page:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for argument in (
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1200,800",
            f"--user-data-dir={FilePath(self.mktemp()).path}",
            f"--ignore-certificate-errors-spki-list={pin}",
        ):
            options.add_argument(argument)
        # "performance": DevTools' Network events, with every WebSocket message.
        options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
        driver = await deferToThread(
            webdriver.Chrome, service=Service(CHROMEDRIVER), options=options
        )
        self.addCleanup(lambda: deferToThread(driver.quit))
        await deferToThread(driver.execute_cdp_cmd, "Network.enable", {})
        return Page(driver)

    async def paired_page(
        self, prefix: str = "", bridge_args: Sequence[str] = ()
    ) -> tuple[RelayService, Page]:
        """
        A relay, a bridge and a page, paired as a person does it: the page shows a code,
        C{coder1-bridge pair} redeems it, both show the same verification code, and
        C{coder1-bridge start} (given C{bridge_args} too) connects. Until the person confirms
        that the codes match the page does not use the bridge (it shows it unverified, sends it
        nothing end to end, and + Terminal stays disabled); once they do, it opens a channel to
        it.
        """
        page = await self.fresh_page()
        relay, url = self.relay, self.url
        await page.shot(f"{prefix}01-page")

        code, command = await self.new_code(page)
        self.assertEqual(
            command, f"coder1-bridge pair --relay {url} --ca-cert {self.cert_shown} {code}"
        )
        self.assertRegex(
            await page.js("return document.querySelector('#pair-countdown').textContent"),
            r"Expires in 4:5\d|Expires in 5:00",
        )
        await page.shot(f"{prefix}02-code")

        env, peer, sas = await self.pair_bridge(command)
        # PAIRED comes once the bridge has presented its key, about when `pair` prints its code.
        shown = await page.wait(
            "const s = document.querySelector('#pair-sas');"
            "return s && s.offsetParent !== null && s.textContent;",
            what="the verification code in the dialog",
        )
        self.assertEqual(shown, sas)
        self.assertIn(
            "Compare with the code coder1-bridge status prints",
            await self.verification_text(page),
        )
        await page.shot(f"{prefix}03-verify")

        self.bridge_env = env
        self.bridge, self.bridge_process = self.start_bridge(env, bridge_args)
        await page.wait(
            "return document.querySelector(`.bridge[data-peer='${arguments[0]}']"
            "[data-connected='true']`)",
            peer,
            what="the bridge to connect",
        )
        await deferLater(reactor, 0.5)
        self.assertTrue(
            await page.js("return document.querySelector('#pair-dialog').open"),
            "the dialog must wait for the person to compare the codes",
        )
        self.assertTrue(await page.js("return document.querySelector('#new-terminal').disabled"))
        await self.assert_unverified(page, peer, sas)
        await page.shot(f"{prefix}03-unverified")
        await page.click("#pair-done")

        await page.wait(
            "return !document.querySelector('#pair-dialog').open"
            " && document.querySelector('.bridge[data-state=\"connected\"]')",
            what="the dialog to close and the bridge to show as connected",
        )
        self.assertIn(
            "connected since",
            await page.js("return document.querySelector('.bridge .state').textContent"),
        )
        self.assertEqual(
            await page.js("return document.querySelector('.bridge .sas').textContent"), sas
        )
        await page.wait(
            "return document.querySelector('.bridge[data-e2e=\"secure\"]')",
            what="the end-to-end channel to the bridge",
        )
        await page.shot(f"{prefix}04-connected")

        return relay, page

    async def fresh_page(self) -> Page:
        """A relay (C{self.relay}, its dev certificate C{self.cert}) and a page connected to it."""
        self.addCleanup(lambda: Deferred.fromCoroutine(settle()))
        self.state_dir = FilePath(self.mktemp())
        self.relay = relay = await start_relay(self.state_dir)
        self.addCleanup(lambda: Deferred.fromCoroutine(stop_all(self.relay)))
        self.url = relay.context.public_url
        self.cert = self.state_dir.child(DEV_CERT_NAME).path
        #: The certificate as the page shows it: the home directory as C{~}.
        self.cert_shown = home_relative(self.cert)
        page = await self.start_browser(spki_pin(relay.keys.tls_cert_pem))
        await page.call(page.driver.get, self.url + "/")
        await page.wait(
            "return document.querySelector('#connection-state').dataset.state === 'connected'",
            what="the IDE connection",
        )
        return page

    async def new_code(self, page: Page) -> tuple[str, str]:
        """Click Bridge: the code the dialog shows, and its command."""
        await page.click("#bridge-button")
        code: str = await page.wait(
            "const c = document.querySelector('#pair-code');"
            "return c.dataset.state === 'live' && c.dataset.code;",
            what="a pairing code",
        )
        command: str = await page.js("return document.querySelector('#pair-command').textContent")
        return code, command

    async def pair_bridge(
        self, command: str, env: dict[str, str] | None = None
    ) -> tuple[dict[str, str], int, str]:
        """
        Run C{command}, the pairing command as the page shows it (or just a code), in a shell,
        as pasted, in a config dir of its own (or C{env}'s): that environment, the bridge's
        number and the verification code it printed.
        """
        if command.isdigit():
            command = f"coder1-bridge pair --relay {self.url} --ca-cert {self.cert} {command}"
        if env is None:
            env = {"XDG_CONFIG_HOME": FilePath(self.mktemp()).path, "SHELL": "/bin/bash"}
        pairing = Collect()
        path = f"{os.path.dirname(BRIDGE)}:{os.environ['PATH']}"
        spawn(pairing, ["/bin/sh", "-c", command], {**env, "PATH": path})
        self.assertEqual(await pairing.ended, 0, pairing.output)
        self.pair_output = pairing.output.decode()
        printed = re.search(rb"Verification code: (\w{4}-\w{4}-\w{4})\s*$", pairing.output, re.M)
        number = re.search(rb"as bridge #(\d+)", pairing.output)
        assert printed is not None and number is not None, pairing.output
        return env, int(number.group(1)), printed.group(1).decode()

    def start_bridge(self, env: dict[str, str], args: Sequence[str] = ()) -> tuple[Collect, Any]:
        """C{coder1-bridge start} in C{env}, with C{args} after it, stopped at cleanup."""
        bridge = Collect(r"refused this bridge: (.*)\.")
        process = spawn(bridge, [BRIDGE, "start", *args], env)
        self.addCleanup(lambda: _stop(process, bridge))
        return bridge, process

    async def verification_text(self, page: Page) -> str:
        """The verification view's text, its white space collapsed."""
        text = await page.js("return document.querySelector('#pair-paired-view').textContent")
        return " ".join(text.split())

    async def assert_unverified(self, page: Page, peer: int, sas: str) -> None:
        """
        The page shows bridge C{peer} unverified, with its verification code C{sas} and a
        Verify button; it cannot be selected, + Terminal does not open a terminal on it, and
        the page has sent it nothing end to end (no KEY_OFFER, nothing sealed).
        """
        item = f".bridge[data-peer='{peer}']"
        state, code, verify, e2e = await page.js(
            "const b = document.querySelector(arguments[0]);"
            "return [b.dataset.state, b.querySelector('.sas').textContent,"
            " !!b.querySelector('button.verify'), b.dataset.e2e];",
            item,
        )
        self.assertEqual((state, code, verify, e2e), ("unverified", sas, True, "none"))
        self.assertIn(
            "Not verified",
            await page.js("return document.querySelector(arguments[0]).textContent", item),
        )
        await page.click(item)
        self.assertEqual(
            await page.js(
                "return document.querySelector(arguments[0]).getAttribute('aria-selected')", item
            ),
            "false",
        )
        self.assertNotEqual(await page.js("return window.coder1.selectedPeer"), peer)
        if await page.js("return document.querySelector('#new-terminal').disabled"):
            await page.click("#new-terminal")  # the button's handler refuses too
            self.assertFalse(
                await page.js(
                    "return [...window.coder1.terminals.values()]"
                    ".some((t) => t.peer === arguments[0])",
                    peer,
                )
            )
        to_it = [
            payload
            for way, payload in await page.websocket_frames()
            if way == "Sent"
            and len(payload) >= HEADER_SIZE
            and payload[1] >= 0x10
            and struct.unpack_from("!I", payload, 4)[0] == peer
        ]
        self.assertEqual(to_it, [], "end-to-end frames sent to an unverified bridge")

    async def test_pair_and_use_a_terminal(self) -> None:
        """
        Open the page, click Bridge, pair with the code shown, compare the
        verification code the page shows with the one C{coder1-bridge pair}
        printed, see the bridge connected, type in a terminal and see the output
        (and none of it in any WebSocket message: they are end-to-end
        encrypted), resize and see C{stty size} follow, exit, and revoke the
        bridge.
        """
        _, page = await self.paired_page()
        await page.new_terminal()
        await page.type("echo hello-$((6*7))-x\n")
        await page.wait_screen(r"^hello-42-x", "the command's output in the terminal")
        await page.shot("05-output")

        # Pasted, the canary goes out in one PTY_INPUT frame; `rev` sends it back reversed.
        canary = f"canary-{os.urandom(8).hex()}"
        await page.js("window.coder1.current.term.paste(arguments[0])", f"echo {canary} | rev")
        await page.type("\n")
        await page.wait_screen(f"^{canary[::-1]}", "the canary, reversed by the bridge's shell")
        await self.assert_encrypted(page, canary)

        # Ctrl-C once sleep runs: typed before, it would reach the shell instead.
        seconds = f"100.{int.from_bytes(os.urandom(4), 'big')}"
        await page.type(f"sleep {seconds}\n")
        await _running(f"sleep\0{seconds}\0")
        await page.ctrl("c")
        await page.type("echo after-$((2+2))\n")
        await page.wait_screen(r"^after-4", "Ctrl-C to stop sleep and the shell to answer")

        # Typed while the channel is being made again: kept and sent, in order, once it is
        # secure; what does not fit (a 70 KB paste) is not sent, and the terminal says so.
        link = "window.coder1.links.get(window.coder1.current.peer)"
        self.assertEqual(await page.js(f"const l = {link}; l.stop(); return l.state;"), "idle")
        await page.type("echo queued-$((6*7))\n")
        await page.js("window.coder1.current.term.paste(arguments[0])", "x" * 70000)
        screen = await page.wait_screen(
            r"\[\d+ bytes of input were not sent: the connection to your machine was being"
            r" re-secured\]",
            "the notice that the paste was not sent",
        )
        self.assertGreaterEqual(int(re.findall(r"\[(\d+) bytes of input", screen)[-1]), 70000)
        self.assertNotRegex(screen, r"(?m)^queued-42")
        await page.js(f"{link}.start()")
        await page.wait_screen(r"^queued-42", "the input typed meanwhile, sent once secure")
        await page.shot("05-queued")
        await page.wait(
            "return document.querySelector('.bridge[data-e2e=\"secure\"]')",
            what="the new channel",
        )
        self.assertNotIn("xxxxxxxxxx", await page.wait_screen(r"^queued-42", "the screen"))

        await page.click("#new-terminal")
        await page.wait_screen(r"[$#] *$", "a prompt in a second terminal")
        await page.type("echo second-$((1+1))\n")
        await page.wait_screen(r"^second-2", "the second terminal's output")
        self.assertEqual(await page.js("return document.querySelectorAll('.tab').length"), 2)
        await page.click(".tab")
        await page.wait_screen(r"^hello-42-x", "the first terminal, unchanged, on its tab")
        await page.shot("06-two-terminals")

        await page.call(page.driver.refresh)
        await page.wait(
            "return document.querySelectorAll('.tab').length === 2",
            what="the page to re-attach to both running terminals after a reload",
        )
        await page.click(".tab")
        await page.type("echo again-$((5*5))\n")
        await page.wait_screen(r"^again-25", "typing in a re-attached terminal")
        await page.shot("07-reattached")

        before = await self.stty_size(page, "stty size; echo end-1\n", "end-1")
        await page.call(page.driver.set_window_size, 900, 600)
        await page.wait(
            "const t = window.coder1.current.term; return t.cols !== arguments[0];",
            before[1],
            what="the terminal to follow the window",
        )
        after = await self.stty_size(page, "clear; stty size; echo end-2\n", "end-2")
        self.assertNotEqual(before, after)
        cols, rows = await page.js("const t = window.coder1.current.term; return [t.cols, t.rows];")
        self.assertEqual(after, (rows, cols))
        await page.shot("08-resized")

        await page.type("exit\n")
        await page.wait(
            "return document.querySelector('.tab[aria-selected=\"true\"]').dataset.state"
            " === 'exited'",
            what="the terminal to close",
        )
        await page.shot("09-exited")
        self.assertTrue(
            await page.js("return document.querySelector('#e2e-error').hidden"),
            await page.js("return document.querySelector('#e2e-error').textContent"),
        )
        await self.assert_encrypted(page, canary)

        # Closing the ended terminal's tab says so to the bridge (PTY_CLOSE), which then
        # forgets that terminal's output (docs/protocol.md 5.7).
        await page.js(
            "const link = window.coder1.links.values().next().value;"
            " const send = link.send.bind(link); window.sentKinds = [];"
            " link.send = (kind, ...rest) => {"
            " window.sentKinds.push(kind); return send(kind, ...rest); };"
        )
        await page.click('.tab[aria-selected="true"] .close')
        self.assertIn(Kind.PTY_CLOSE, await page.js("return window.sentKinds"))

        await page.click(".bridge .revoke")
        await page.click(".bridge .revoke")
        match = await self.bridge.matched
        self.assertIn(b"revoked", match.group(1))
        self.assertEqual(await self.bridge.ended, 3)
        await page.wait(
            "return document.querySelectorAll('.bridge').length === 0", what="the bridge to go"
        )
        await page.shot("10-revoked")

    async def test_a_lying_relay_is_caught(self) -> None:
        """
        A relay that alters a frame on its way to the page is caught: the page shows the
        verdict and writes nothing of that frame to the terminal. The channel survives the
        refused frame itself (junk cannot end it), but the gap it leaves in the bridge's frames
        does: the page starts a new channel and resumes it from the last byte it took in, so
        the bridge sends the genuine output again, and it shows up once (nothing of the altered
        frame, nothing lost, nothing twice); the terminal works on. A relay that then names
        another key for the bridge gets the bridge marked "key changed", and the page sends it
        nothing.
        """
        relay, page = await self.paired_page("tamper-")
        await page.new_terminal()
        link = "window.coder1.links.get(window.coder1.current.peer)"
        channel = await page.js(f"return {link}.channel.id")

        tampered = tamper_next_output(relay)
        # The whole line in one PTY_INPUT frame; its echo and output come back altered.
        await page.js("window.coder1.current.term.input(arguments[0])", "echo tamper-$((3*3))\r")
        await tampered
        verdict = await page.wait(
            "const b = document.querySelector('#e2e-error');return !b.hidden && b.dataset.verdict;",
            what="the page to report the altered frame",
        )
        self.assertEqual(verdict, "tampered")
        await page.shot("tamper-05-refused")
        # One more frame from the bridge (a new prompt) shows the gap, if the altered frame was
        # its last one: the page then needs a new channel.
        await page.js("window.coder1.current.term.input(arguments[0])", "\r")
        await page.wait(
            f"const l = {link}; return l && l.secure && l.channel.id !== arguments[0];",
            channel,
            what="a new end-to-end channel after the gap",
        )
        banner = await page.js(
            "const b = document.querySelector('#e2e-error');"
            "return [b.dataset.verdict, b.textContent];"
        )
        self.assertEqual(banner[0], "tampered", banner)
        self.assertIn("“tampered”", banner[1])
        self.assertIn("Starting a new secure channel", banner[1])
        await page.type("echo after-$((4*4))\n")
        screen = await page.wait_screen(r"^after-16", "the terminal working on the new channel")
        self.assertEqual(len(re.findall(r"(?m)^tamper-9\s*$", screen)), 1, screen)
        self.assertEqual(screen.count("echo tamper-$((3*3))"), 1, screen)
        await page.shot("tamper-06-recovered")

        peer, since = await page.js(
            "const peer = Number(document.querySelector('.bridge').dataset.peer);"
            "return [peer, window.coder1.bridges.get(peer).since];"
        )
        entry = {"peer": peer, "label": "vm", "version": "0.1.0", "since": since}
        entry["bridge_key"] = b64u(Identity.generate().public_raw)
        for connection in relay.context.connections.live:
            if isinstance(connection, IDEProtocol):
                connection.send(control(Kind.PRESENCE, {"bridges": [entry]}).encode())
        await page.wait(
            "return document.querySelector('.bridge[data-state=\"key-changed\"]')",
            what="the bridge to be shown with a changed key",
        )
        self.assertIn(
            "This bridge's key changed: someone may be intercepting. Revoke it and pair again.",
            await page.js("return document.querySelector('.bridge').textContent"),
        )
        self.assertTrue(await page.js("return document.querySelector('#new-terminal').disabled"))
        self.assertEqual(
            await page.js("return document.querySelector('.tab').dataset.state"), "exited"
        )
        await page.shot("tamper-07-key-changed")
        before = len(await page.websocket_frames())
        await page.type("echo nothing-goes-out\n")
        await deferLater(reactor, 0.5)
        after = (await page.websocket_frames())[before:]
        kinds = [payload[1] for way, payload in after if way == "Sent" and len(payload) >= 20]
        self.assertEqual([k for k in kinds if k >= 0x10], [], "frames sent to a bridge refused")

    async def test_a_bridge_not_compared_is_not_used(self) -> None:
        """
        A bridge paired while the dialog was closed (here with a code the test asks for
        through the page's own session and key, as another tab would) shows up unverified,
        with its verification code: the page sends it nothing, never selects it, and + Terminal
        stays disabled for it, until the person clicks Verify, compares the code with the one
        C{coder1-bridge status} prints and says they match. Then it is used like any other.
        """
        _, page = await self.paired_page("unverified-")
        first = await page.js("return window.coder1.selectedPeer")
        # What the Bridge button does, minus the dialog: this browser's own key, from IndexedDB.
        code = await page.js(
            "return (async () => {"
            " const { b64u, loadIdentity } = await import('./e2e.js');"
            " const identity = await loadIdentity();"
            " const response = await fetch('/api/pairing-codes', {method: 'POST',"
            "  headers: {'Content-Type': 'application/json'},"
            "  body: JSON.stringify({browser_key: b64u(identity.raw)})});"
            " return (await response.json()).code;"
            "})();"
        )
        self.assertFalse(await page.js("return document.querySelector('#pair-dialog').open"))
        env, peer, sas = await self.pair_bridge(code)
        self.assertNotEqual(peer, first)
        item = f".bridge[data-peer='{peer}']"
        await page.wait(
            "const b = document.querySelector(arguments[0]); return b && b.querySelector('.sas');",
            item,
            what="the second bridge in the list",
        )
        self.start_bridge(env)
        await page.wait(
            "return document.querySelector(arguments[0]).dataset.connected === 'true'",
            item,
            what="the second bridge to connect",
        )
        await deferLater(reactor, 1.0)
        self.assertFalse(await page.js("return document.querySelector('#pair-dialog').open"))
        self.assertEqual(await page.js("return window.coder1.selectedPeer"), first)
        await self.assert_unverified(page, peer, sas)
        await page.shot("unverified-05-second")

        # Without the first bridge, nothing can be selected: + Terminal stays disabled.
        await page.click(f".bridge[data-peer='{first}'] .revoke")
        await page.click(f".bridge[data-peer='{first}'] .revoke")
        self.assertEqual(await self.bridge.ended, 3)
        await page.wait(
            "return document.querySelectorAll('.bridge').length === 1", what="the first to go"
        )
        await deferLater(reactor, 0.5)
        self.assertTrue(await page.js("return document.querySelector('#new-terminal').disabled"))
        await self.assert_unverified(page, peer, sas)
        await page.shot("unverified-06-alone")

        status = Collect()
        spawn(status, [BRIDGE, "status"], env)
        self.assertEqual(await status.ended, 0, status.output)
        printed = re.search(rb"verification code (\w{4}-\w{4}-\w{4})", status.output)
        assert printed is not None, status.output
        self.assertEqual(printed.group(1).decode(), sas)

        await page.click(f"{item} .verify")
        shown = await page.wait(
            "const s = document.querySelector('#pair-sas');"
            "return document.querySelector('#pair-dialog').open && s.offsetParent !== null"
            " && s.textContent;",
            what="the verification view",
        )
        self.assertEqual(shown, sas)
        self.assertIn(
            "Compare with the code coder1-bridge status prints",
            await self.verification_text(page),
        )
        self.assertTrue(await page.js("return document.querySelector('#new-terminal').disabled"))
        await page.shot("unverified-07-verify")
        await page.click("#pair-done")
        await page.wait(
            f"return document.querySelector(\"{item}[data-state='connected'][data-e2e='secure']\")"
            " && !document.querySelector('#new-terminal').disabled",
            what="the verified bridge to be used",
        )
        self.assertEqual(await page.js("return window.coder1.selectedPeer"), peer)
        await page.click("#new-terminal")
        await page.wait_screen(r"[$#] *$", "a shell prompt on the second bridge")
        await page.type("echo second-$((8*8))\n")
        await page.wait_screen(r"^second-64", "the second bridge's shell")
        await page.shot("unverified-08-used")
        # The confirmation is kept: after a reload the bridge is used without asking again.
        await page.call(page.driver.refresh)
        await page.wait(
            f"return document.querySelector(\"{item}[data-state='connected'][data-e2e='secure']\")",
            what="the verified bridge after a reload",
        )
        self.assertFalse(await page.js("return document.querySelector('#pair-dialog').open"))

    async def other_site(self, target: str) -> str:
        """
        A page on another site (plain HTTP on 127.0.0.1, another port) whose one element is a
        link to C{target}: its URL.
        """
        html = f'<!doctype html><title>elsewhere</title><a id="go" href="{target}">IDE</a>'
        root = Resource()
        root.putChild(b"", Data(html.encode(), "text/html"))
        port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(Site(root))
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}/"

    async def session_cookie(self, page: Page) -> str:
        """The page's session cookie (HttpOnly: WebDriver sees it, the page's script does not)."""
        cookie = await page.call(page.driver.get_cookie, SESSION_COOKIE)
        assert cookie is not None
        return str(cookie["value"])

    async def pair_again(self, page: Page, prefix: str) -> int:
        """
        Click Bridge and pair another machine with the code shown: the dialog asks to compare
        its verification code, with no word of a changed key anywhere. Its number.
        """
        await page.click("#bridge-button")
        code = await page.wait(
            "const c = document.querySelector('#pair-code');"
            "return c.dataset.state === 'live' && c.dataset.code;",
            what="a pairing code",
        )
        _, peer, sas = await self.pair_bridge(code)
        shown = await page.wait(
            "const s = document.querySelector('#pair-sas');"
            "return s && s.offsetParent !== null && s.textContent;",
            what="the verification code of the new bridge",
        )
        await page.shot(prefix)
        self.assertEqual(shown, sas)
        self.assertEqual(
            await page.js("return document.querySelector('#pair-message').textContent"), ""
        )
        self.assertIsNone(
            await page.js("return document.querySelector('.bridge[data-state=\"key-changed\"]')")
        )
        self.assertNotIn("key changed", await page.js("return document.body.textContent"))
        await page.click("#pair-close")
        return peer

    async def test_a_link_from_another_site_keeps_the_session(self) -> None:
        """
        A paired page goes to a page on another site, and the person clicks its link back to
        the relay. The browser does not send the SameSite=Strict cookie with that navigation,
        and the relay does not answer it with a new session: the page keeps its session, its
        bridge is still listed, verified and connected, and pairing another machine asks to
        compare codes with no alarm. Then the session does end while the page is open (its
        cookie deleted, as when it expires): when the page reconnects it is in a new session,
        whose bridges it lists instead of the old one's (whose terminal ends, saying why);
        they are numbered from 1 again, and
        the first one it pairs, with a new key, is not taken for the old bridge 1 (pins are
        kept by key): no alarm either.
        """
        relay, page = await self.paired_page("link-")
        peer = await page.js("return Number(document.querySelector('.bridge').dataset.peer)")
        cookie = await self.session_cookie(page)
        elsewhere = await self.other_site(self.url + "/")
        await page.call(page.driver.get, elsewhere)
        await page.shot("link-05-elsewhere")
        from selenium.webdriver.common.by import By

        link = await page.call(page.driver.find_element, By.ID, "go")
        await page.call(link.click)
        item = f".bridge[data-peer='{peer}']"
        await page.wait(
            "return location.origin === arguments[0]"
            f" && document.querySelector(\"{item}[data-state='connected'][data-e2e='secure']\")",
            self.url,
            what="the relay's page from the link, with the session's bridge verified and secure",
        )
        await page.shot("link-06-back")
        self.assertEqual(await self.session_cookie(page), cookie)
        await page.new_terminal()
        await page.type("echo still-$((6*7))\n")
        await page.wait_screen(r"^still-42", "a terminal on the session's bridge")
        self.assertNotEqual(await self.pair_again(page, "link-07-paired-again"), peer)

        # The cookie goes while the page is open; its IDE connection drops, and reconnecting
        # it starts a new session.
        await page.call(page.driver.delete_all_cookies)
        for connection in list(relay.context.connections.live):
            if isinstance(connection, IDEProtocol):
                connection.abort()
        await page.wait(
            "return document.querySelector('#connection-state').dataset.state === 'connected'"
            " && document.querySelector('#no-bridges').hidden === false",
            what="the page in a new session, with no bridges",
        )
        await page.wait_screen(
            r"\[this browser's session was renewed: pair this machine again\]",
            "the old session's terminal ended, saying why",
        )
        self.assertEqual(await page.js("return window.coder1.current.state"), "exited")
        self.assertNotEqual(await self.session_cookie(page), cookie)
        self.assertEqual(await self.pair_again(page, "link-08-new-session"), 1)

    async def test_confirmations_kept_from_pins_by_number(self) -> None:
        """
        A browser profile from before pins were kept by key (IndexedDB version 1: the pin of a
        bridge under C{"<origin> <peer>"}, confirmed) keeps its confirmation: the page moves
        it to the key, and uses the bridge at once, without asking again.
        """
        _, page = await self.paired_page("migrate-")
        peer, key = await page.js(
            "const peer = Number(document.querySelector('.bridge').dataset.peer);"
            "return [peer, window.coder1.bridges.get(peer).key];"
        )
        # A page of the relay's origin without the IDE, which would hold the database open.
        await page.call(page.driver.get, self.url + "/no-such-page")
        stored = await page.js(
            "const done = arguments[arguments.length - 1];"
            "const [origin, peer, key] = arguments;"
            "const wait = (r) => new Promise((ok, no) => { r.onsuccess = () => ok(r.result);"
            " r.onerror = () => no(r.error); });"
            "(async () => {"
            " let db = await wait(indexedDB.open('coder1'));"
            " const keys = db.transaction('keys').objectStore('keys');"
            " const identity = await wait(keys.get('identity'));"
            " db.close();"
            " await wait(indexedDB.deleteDatabase('coder1'));"
            " const open = indexedDB.open('coder1', 1);"
            " open.onupgradeneeded = () => { const d = open.result;"
            "  d.createObjectStore('keys').put(identity, 'identity');"
            "  d.createObjectStore('pins').put({key, confirmed: true}, `${origin} ${peer}`); };"
            " db = await wait(open);"
            " const pins = await wait(db.transaction('pins').objectStore('pins').getAllKeys());"
            " db.close();"
            " return pins;"
            "})().then(done, (e) => done(String(e)));",
            self.url,
            peer,
            key,
            asynchronous=True,
        )
        self.assertEqual(stored, [f"{self.url} {peer}"])
        await page.call(page.driver.get, self.url + "/")
        await page.wait(
            f"return document.querySelector(\".bridge[data-peer='{peer}'][data-state='connected']"
            "[data-e2e='secure']\")",
            what="the bridge used at once, its confirmation kept",
        )
        self.assertFalse(await page.js("return document.querySelector('#pair-dialog').open"))
        pins = await page.js(
            "const done = arguments[arguments.length - 1];"
            "const r = indexedDB.open('coder1');"
            "r.onsuccess = () => { const g = r.result.transaction('pins').objectStore('pins')"
            " .getAllKeys(); g.onsuccess = () => done([r.result.version, g.result]); };",
            asynchronous=True,
        )
        self.assertEqual(pins, [2, [f"{self.url} {key}"]])
        await page.shot("migrate-05-kept")

    async def test_the_page_comes_back_at_once_after_a_restart(self) -> None:
        """
        A relay that stops (SIGTERM's drain) closes the page's WebSocket with 1001, going
        away: the page retries 0.1-1 s apart without counting towards its backoff (failed
        attempts while nothing listens included), and is connected again once a relay listens
        on the port again.
        """
        page = await self.fresh_page()
        port = self.relay.port.getHost().port  # type: ignore[union-attr]
        connection = "window.coder1.connection"
        await page.js(
            f"const c = {connection}; const connect = c.connect.bind(c);"
            "c.tries = 0; c.connect = () => { c.tries += 1; connect(); };"
        )
        await stop_all(self.relay)
        state = "return document.querySelector('#connection-state').dataset.state"
        await page.wait(f"{state} !== 'connected'", what="the page to see the relay gone")
        await page.wait(
            f"return {connection}.tries >= 3", what="attempts while no relay listens", timeout=10
        )
        self.assertEqual(
            await page.js(f"return [{connection}.attempt, {connection}.promptUntil !== null]"),
            [0, True],
        )
        self.relay = await start_relay(self.state_dir, listen=f"tcp:{port}:interface=127.0.0.1")
        await page.wait(f"{state} === 'connected'", what="the page back", timeout=10)

    async def test_output_and_input_survive_a_relay_crash(self) -> None:
        """
        A terminal prints half a million numbered lines (3.9 MB), paced so that the page is
        still receiving them when the relay is killed (every connection dropped, nothing said);
        keys typed while it is down wait in the page; the relay starts again on the same port
        and state dir. The page reconnects by itself, makes a new channel and resumes: in the
        end the terminal has every line exactly once and in order (nothing dropped, nothing
        twice, no GAP), and the keys typed during the outage run exactly once.
        """
        relay, page = await self.paired_page("resume-")
        await page.new_terminal()
        # Everything written to the terminal, in order, as text.
        await page.js(
            "const tab = window.coder1.current; const decoder = new TextDecoder();"
            "const write = tab.term.write.bind(tab.term); tab.captured = [];"
            "tab.term.write = (data, callback) => {"
            " tab.captured.push(typeof data === 'string' ? data"
            "  : decoder.decode(data, { stream: true }));"
            " write(data, callback); };"
        )
        batches, per_batch = 100, 5000
        lines = batches * per_batch
        total = sum(len(f"{i}\r\n") for i in range(1, lines + 1))
        # No echo while it runs: keys typed meanwhile must not land between the numbers.
        command = (
            f"stty -echo; for i in $(seq 0 {batches - 1}); do"
            f" seq $((i*{per_batch}+1)) $((i*{per_batch}+{per_batch})); sleep 0.03; done;"
            " stty echo; echo done-$((6*7))"
        )
        await page.js("window.coder1.current.term.paste(arguments[0])", command)
        await page.type("\n")
        tab = "window.coder1.current"
        before = await page.wait(
            f"const n = {tab}.written; return n > 1200000 && n;",
            what="the numbers to start arriving",
            timeout=60,
        )

        port = relay.port.getHost().port  # type: ignore[union-attr]
        crashed = reactor.seconds()
        await crash_relay(relay)
        at_crash = await page.js(f"return {tab}.written")
        await page.wait(
            "return document.querySelector('#connection-state').dataset.state !== 'connected'",
            what="the page to see the relay gone",
        )
        await page.type("echo typed-$((7*6))\n")
        await page.shot("resume-05-outage")
        await deferLater(reactor, 3.0)
        during = await page.js(f"return {tab}.written")
        self.relay = await start_relay(self.state_dir, listen=f"tcp:{port}:interface=127.0.0.1")
        restarted = reactor.seconds()
        self.addCleanup(lambda: Deferred.fromCoroutine(stop_all(self.relay)))

        await page.wait(
            "return document.querySelector('.bridge[data-e2e=\"secure\"]')",
            what="a new channel through the restarted relay",
            timeout=60,
        )
        resumed = reactor.seconds()
        await page.wait(
            f"return /[\\r\\n]typed-42\\r\\n/.test({tab}.captured.join(''))",
            what="every line, then the keys typed during the outage",
            timeout=120,
        )
        await page.shot("resume-06-resumed")
        found = await page.js(
            f"const tab = {tab}; const text = tab.captured.join('');"
            "let expected = '';"
            "for (let i = 1; i <= arguments[0]; i += 1) expected += `${i}\\r\\n`;"
            # Bash ends bracketed paste (ESC [?2004l CR) before it runs a line.
            "const start = text.search(/[\\r\\n]1\\r\\n2\\r\\n3\\r\\n/) + 1;"
            "const count = (s) => text.split(s).length - 1;"
            "return {start, whole: text.substr(start, expected.length) === expected,"
            " after: text.substr(start + expected.length, 9),"
            " last: count(`\\n${arguments[0]}\\r\\n`),"
            " typed: (text.match(/[\\r\\n]typed-42\\r\\n/g) || []).length,"
            " gap: text.includes('of output were dropped'),"
            " unsent: text.includes('of input were not sent'),"
            " written: tab.written, next: tab.output.next,"
            " screen: tab.element.querySelector('.xterm-rows').innerText};",
            lines,
        )
        self.assertGreater(found["start"], 0, found["screen"])
        self.assertTrue(found["whole"], "the numbers are not all there, once and in order")
        self.assertEqual(found["after"], "done-42\r\n")
        self.assertEqual((found["last"], found["typed"]), (1, 1))
        self.assertFalse(found["gap"], "the page reported output as dropped")
        self.assertFalse(found["unsent"], "the page reported input as not sent")
        self.assertGreaterEqual(found["written"], total)
        self.assertRegex(found["screen"], rf"(?m)^{lines - 1}\s*\n{lines}\s*\ndone-42")
        self.assertLess(at_crash, total, "the relay went down after the page had everything")
        self.assertTrue(await page.js("return document.querySelector('#e2e-error').hidden"))
        _log.info(
            "{summary}",
            summary=f"resume: {lines} lines, {total} bytes of numbers; {before} bytes written when"
            f" the crash began, {at_crash} after it, {during} during the outage; relay down"
            f" {restarted - crashed:.1f} s, secure again {resumed - restarted:.1f} s later;"
            f" {found['written']} bytes of output written in all, position {found['next']}",
        )

    async def test_output_dropped_while_the_page_was_away_is_shown(self) -> None:
        """
        With C{--replay-buffer 65536}, a terminal runs a command that waits 3 s and then
        prints 2 MB; the relay is killed while it waits, so no page follows the terminal
        while it prints, and the bridge keeps only the last 64 KiB. When the relay is back
        the page resumes and the bridge sends GAP first: the terminal shows the dim line
        C{[N bytes of output were dropped while this page was away]} with N over a million,
        then the end of the output (its last line and C{done-42}), and still takes commands.
        """
        relay, page = await self.paired_page("gap-", ["--replay-buffer", "65536"])
        await page.new_terminal()
        marker = FilePath(self.mktemp()).path
        # Lines of 62 bytes, so that the 64 KiB kept (about 1,060 lines) and the GAP line
        # before them fit in the terminal's 5,000 lines of scrollback.
        lines = 33000
        command = (
            f"echo started > {marker}; sleep 3; seq -f %060g 1 {lines};"
            f" echo done-$((6*7)); echo finished > {marker}"
        )
        await page.js("window.coder1.current.term.paste(arguments[0])", command)
        await page.type("\n")
        deadline = reactor.seconds() + 10
        while not os.path.exists(marker):  # the bridge has the Enter: the command runs
            self.assertLess(reactor.seconds(), deadline, "the command did not start")
            await deferLater(reactor, 0.05)

        port = relay.port.getHost().port  # type: ignore[union-attr]
        await crash_relay(relay)
        await page.wait(
            "return document.querySelector('#connection-state').dataset.state !== 'connected'",
            what="the page to see the relay gone",
        )
        await page.shot("gap-05-outage")
        deadline = reactor.seconds() + 20
        while FilePath(marker).getContent() != b"finished\n":
            self.assertLess(reactor.seconds(), deadline, "the command did not finish")
            await deferLater(reactor, 0.1)
        await deferLater(reactor, 0.5)  # for the bridge to read the last of it
        self.relay = await start_relay(self.state_dir, listen=f"tcp:{port}:interface=127.0.0.1")
        self.addCleanup(lambda: Deferred.fromCoroutine(stop_all(self.relay)))
        await page.wait(
            "return document.querySelector('.bridge[data-e2e=\"secure\"]')",
            what="a new channel through the restarted relay",
            timeout=60,
        )

        # The whole of xterm's buffer, scrollback included: what the person can scroll to.
        read_buffer = (
            "const b = window.coder1.current.term.buffer.active; const rows = [];"
            "for (let i = 0; i < b.length; i += 1) rows.push(b.getLine(i).translateToString(true));"
            "return rows.join('\\n');"
        )
        await page.wait(
            read_buffer.replace("return ", "const text = ") + "; return /^done-42$/m.test(text);",
            what="the end of the output after the resume",
            timeout=30,
        )
        await page.shot("gap-06-resumed")
        text: str = await page.js(read_buffer)
        gap = re.search(
            r"^\[(\d+) bytes of output were dropped while this page was away\]$", text, re.M
        )
        assert gap is not None, text[-3000:]
        dropped = int(gap.group(1))
        self.assertGreater(dropped, 1_000_000)
        self.assertLess(dropped, 62 * lines)
        after = text[gap.end() :]
        self.assertRegex(after, rf"(?m)^{lines:060d}\n^done-42$")
        self.assertEqual(len(re.findall(r"bytes of output were dropped", text)), 1, text)
        self.assertNotRegex(after, rf"(?m)^{1:060d}$", "output from before the gap after it")
        gaps = [
            payload
            for way, payload in await page.websocket_frames()
            if way == "Received" and len(payload) >= HEADER_SIZE and payload[1] == Kind.GAP
        ]
        self.assertEqual(len(gaps), 1, "the page did not get exactly one GAP frame")

        await page.type("echo ok-$((6*7))\n")
        await page.wait_screen(r"^ok-42", "a command after the resume")
        self.assertTrue(await page.js("return document.querySelector('#e2e-error').hidden"))
        await page.shot("gap-07-usable")
        _log.info("{summary}", summary=f"gap: {dropped} bytes dropped while the page was away")

    async def test_a_terminal_its_restarted_bridge_lost_ends(self) -> None:
        """
        A terminal works; its bridge is killed (a crash: it cannot end its terminals first)
        and a new one started from the same config (a bridge restart: its terminals are
        gone). The page makes a new channel to it and sends RESUME with the tab; the bridge
        answers RESUMED with the tab's stream as C{unknown}, so the tab ends, saying the
        terminal is gone, rather than waiting for output that will never come. + Terminal
        then opens a terminal on the new bridge that works.
        """
        _, page = await self.paired_page("gone-")
        await page.new_terminal()
        await page.type("echo hi-$((6*7))\n")
        await page.wait_screen(r"^hi-42", "the command's output in the terminal")
        tab = await page.js("return window.coder1.current.output.key")
        peer = await page.js("return window.coder1.current.peer")
        item = f".bridge[data-peer='{peer}']"
        await page.shot("gone-05-working")

        # Killed, as a crash or a reboot does: stopped, it would end its terminals first.
        self.bridge_process.signalProcess("KILL")
        await self.bridge.ended
        await page.wait(
            "return document.querySelector(arguments[0]).dataset.connected !== 'true'",
            item,
            what="the page to see the bridge gone",
        )
        self.assertEqual(
            await page.js("return window.coder1.current.state"),
            "running",
            "the tab ended before the bridge came back",
        )
        self.bridge, self.bridge_process = self.start_bridge(self.bridge_env)
        await page.wait(
            "return document.querySelector(arguments[0]).dataset.connected === 'true'"
            " && document.querySelector(arguments[0]).dataset.e2e === 'secure'",
            item,
            what="a new channel to the restarted bridge",
            timeout=60,
        )
        await page.wait(
            "return document.querySelector('.tab[aria-selected=\"true\"]').dataset.state"
            " === 'exited'",
            what="the terminal the restarted bridge does not know to end",
        )
        screen = await page.wait_screen(
            r"\[this terminal is gone: its machine's bridge restarted",
            "the notice that the terminal is gone",
        )
        self.assertRegex(screen, r"(?m)^hi-42")
        self.assertEqual(await page.js("return window.coder1.current.output.key"), tab)
        await page.shot("gone-06-ended")

        await page.wait(
            "return !document.querySelector('#new-terminal').disabled", what="+ Terminal again"
        )
        await page.click("#new-terminal")
        await page.wait(
            "return window.coder1.current.output.key !== arguments[0]",
            tab,
            what="a second tab",
        )
        await page.wait_screen(r"[$#] *$", "a shell prompt on the restarted bridge")
        await page.type("echo again-$((6*7))\n")
        await page.wait_screen(r"^again-42", "the new terminal's output")
        self.assertEqual(await page.js("return document.querySelectorAll('.tab').length"), 2)
        self.assertEqual(
            await page.js("return document.querySelector('.tab').dataset.state"), "exited"
        )
        self.assertTrue(
            await page.js("return document.querySelector('#e2e-error').hidden"),
            await page.js("return document.querySelector('#e2e-error').textContent"),
        )
        await page.shot("gone-07-new-terminal")

    async def test_pairing_dialog_is_complete_copies_and_says_what_to_do(self) -> None:
        """
        The dialog's command is complete for a development relay (C{--ca-cert} with the
        certificate the relay printed), and each copy button copies what it is next to (the
        code as its six digits); the command copied, pasted into a shell as is, pairs. When
        the codes differ, the dialog shows a view of its own (not the code view with an empty
        command): what happened, the bridge revoked, C{coder1-bridge unpair} with its copy
        button, and Pair again, which shows a new code and its command.
        """
        page = await self.fresh_page()
        await grant_clipboard(page, self.url)
        code, command = await self.new_code(page)
        self.assertEqual(
            command, f"coder1-bridge pair --relay {self.url} --ca-cert {self.cert_shown} {code}"
        )
        self.assertIn(
            "This development relay's certificate is that file",
            await page.js("return document.querySelector('#pair-hint').textContent"),
        )
        await page.click("#pair-code-copy")
        self.assertEqual(await clipboard(page), code)
        self.assertEqual(
            await page.js("return document.querySelector('#pair-code-copy').textContent"),
            "Copied",
        )
        await page.click("#pair-command-copy")
        pasted = await clipboard(page)
        self.assertEqual(pasted, command)
        await page.shot("dialog-01-copied")

        env, peer, _ = await self.pair_bridge(pasted)
        await page.wait(
            "return document.querySelector('#pair-dialog').dataset.view === 'paired'",
            what="the verification view",
        )
        await page.click("#pair-mismatch")
        await page.wait(
            "return document.querySelector('#pair-dialog').dataset.view === 'mismatch'"
            " && document.querySelectorAll('.bridge').length === 0",
            what="the mismatch view, and the bridge revoked",
        )
        shown = await page.js(
            "const visible = (s) => document.querySelector(s).offsetParent !== null;"
            "return {title: document.querySelector('#pair-title').textContent,"
            " code: visible('#pair-code-view'), command: visible('#pair-command'),"
            " mismatch: visible('#pair-mismatch-view'),"
            " text: document.querySelector('#pair-mismatch-view').textContent};"
        )
        self.assertEqual(shown["title"], "The verification codes differ")
        self.assertEqual((shown["code"], shown["command"], shown["mismatch"]), (False, False, True))
        text = " ".join(shown["text"].split())
        self.assertIn("This browser has revoked that bridge", text)
        self.assertIn("click Pair again and run the new command", text)
        await page.click("#pair-unpair-copy")
        self.assertEqual(await clipboard(page), "coder1-bridge unpair")
        await page.shot("dialog-02-mismatch")
        status = Collect()
        spawn(status, [BRIDGE, "status"], env)
        self.assertEqual(await status.ended, 3, status.output)

        await page.click("#pair-again")
        again = await page.wait(
            "const c = document.querySelector('#pair-code');"
            "return document.querySelector('#pair-dialog').dataset.view === 'code'"
            " && c.dataset.state === 'live' && c.dataset.code !== arguments[0] && c.dataset.code;",
            code,
            what="a new code",
        )
        self.assertEqual(
            await page.js("return document.querySelector('#pair-command').textContent"),
            f"coder1-bridge pair --relay {self.url} --ca-cert {self.cert_shown} {again}",
        )
        await page.shot("dialog-03-again")
        self.assertEqual(peer, 1)

    async def test_bridge_cards_say_what_is_known(self) -> None:
        """
        A bridge card says what the page knows: a bridge paired but never started says how
        to start it (not that it waits for a reconnect); a running one, since when; while the
        page itself is reconnecting to the relay, that its state is unknown (not green); one
        that stopped, that the page waits for it. Pairing the same machine again replaces its
        card (the old token revoked); two machines with the same label show their numbers.
        """
        page = await self.fresh_page()
        _, command = await self.new_code(page)
        env, peer, _ = await self.pair_bridge(command)
        await self.confirm(page)
        item = f".bridge[data-peer='{peer}']"
        state = (
            "const b = document.querySelector(arguments[0]);"
            "return b && [b.dataset.presence, b.dataset.state,"
            " b.querySelector('.state').textContent];"
        )
        await page.wait(
            "const b = document.querySelector(arguments[0]);"
            "return b && b.dataset.presence === 'not-started';",
            item,
            what="the card of a bridge never started",
        )
        _, data_state, text = await page.js(state, item)
        self.assertEqual(data_state, "not-started")
        self.assertEqual(text, "not running: on that machine, run coder1-bridge start")
        await page.shot("cards-01-not-started")

        bridge, process = self.start_bridge(env)
        await page.wait(
            "return document.querySelector(arguments[0]).dataset.state === 'connected'",
            item,
            what="the bridge to connect",
        )
        self.assertIn("connected since", (await page.js(state, item))[2])
        await page.shot("cards-02-connected")

        port = self.relay.port.getHost().port  # type: ignore[union-attr]
        await crash_relay(self.relay)
        await page.wait(
            "return document.querySelector(arguments[0]).dataset.presence === 'unknown'",
            item,
            what="the card while the page reconnects",
        )
        _, data_state, text = await page.js(state, item)
        self.assertNotEqual(data_state, "connected")
        self.assertEqual(text, "unknown while this page reconnects to the relay")
        await page.shot("cards-03-page-reconnecting")
        self.relay = await start_relay(self.state_dir, listen=f"tcp:{port}:interface=127.0.0.1")
        await page.wait(
            "return document.querySelector(arguments[0]).dataset.state === 'connected'",
            item,
            what="the bridge connected again, as the page sees it",
            timeout=60,
        )
        await _stop(process, bridge)
        await page.wait(
            "return document.querySelector(arguments[0]).dataset.presence === 'disconnected'",
            item,
            what="the card of a bridge that stopped",
        )
        self.assertEqual(
            (await page.js(state, item))[2], "disconnected: waiting for it to reconnect"
        )
        await page.shot("cards-04-stopped")

        _, command = await self.new_code(page)
        _, again, _ = await self.pair_bridge(command, env)
        self.assertIn(f"Revoked the previous pairing (bridge #{peer} at", self.pair_output)
        await self.confirm(page)
        await page.wait(
            "return [...document.querySelectorAll('.bridge')].map((b) => b.dataset.peer)"
            ".join() === String(arguments[0])",
            again,
            what="the card of the first pairing to go",
        )
        _, command = await self.new_code(page)
        _, other, _ = await self.pair_bridge(command)
        await self.confirm(page)
        labels = await page.wait(
            "const l = [...document.querySelectorAll('.bridge .label')].map((e) => e.textContent);"
            "return l.length === 2 && l;",
            what="both bridges listed",
        )
        host = labels[0].rsplit("#", 1)[0]
        self.assertEqual(labels, [f"{host}#{again}", f"{host}#{other}"])
        await page.shot("cards-05-same-label")

    async def confirm(self, page: Page) -> None:
        """Say the verification codes match, once the dialog shows them."""
        await page.wait(
            "return document.querySelector('#pair-dialog').dataset.view === 'paired'",
            what="the verification view",
        )
        await page.click("#pair-done")
        await page.wait(
            "return !document.querySelector('#pair-dialog').open", what="the dialog to close"
        )

    async def test_narrow_screen_and_the_terminal_fits_its_pane(self) -> None:
        """
        The terminal's screen fits inside its pane (no row or column clipped), wide and
        narrow. Below 600 px the bridge list is a strip above the terminals, not half of the
        screen beside them, and the pairing dialog fits the screen.
        """
        _, page = await self.paired_page("narrow-")
        await page.new_terminal()
        fit = await terminal_fit(page)
        self.assertLessEqual(fit["over"], 0.01, fit)
        await page.shot("narrow-05-wide")

        await page.call(page.driver.set_window_size, 420, 760)
        width = await page.wait(
            "return window.innerWidth < 600 && window.innerWidth", what="a narrow window"
        )
        await page.wait(
            "const t = window.coder1.current.term; return t.cols !== arguments[0];",
            fit["cols"],
            what="the terminal to follow the window",
        )
        fit = await terminal_fit(page)
        self.assertLessEqual(fit["over"], 0.01, fit)
        layout = await page.js(
            "const r = (s) => document.querySelector(s).getBoundingClientRect();"
            "return {aside: [r('aside').width, r('aside').height],"
            " workspace: r('#workspace').width, height: window.innerHeight};"
        )
        self.assertGreaterEqual(layout["aside"][0], width - 1, layout)
        self.assertLessEqual(layout["aside"][1], 0.36 * layout["height"], layout)
        self.assertGreaterEqual(layout["workspace"], width - 1, layout)
        await page.shot("narrow-06-terminal")

        await page.click("#bridge-button")
        await page.wait(
            "return document.querySelector('#pair-code').dataset.state === 'live'",
            what="a code",
        )
        dialog = await page.js(
            "const d = document.querySelector('#pair-dialog').getBoundingClientRect();"
            "return [d.left, d.right, window.innerWidth];"
        )
        self.assertGreaterEqual(dialog[0], 0, dialog)
        self.assertLessEqual(dialog[1], dialog[2], dialog)
        await page.shot("narrow-07-dialog")

    async def assert_encrypted(self, page: Page, canary: str) -> None:
        """
        No WebSocket message the page sent or received holds the canary (or its reverse), in
        any of the forms a leak could take, while the unencrypted parts (control frames, the
        key offer) are found by the same search; terminal frames all look sealed.
        """
        frames = await page.websocket_frames()
        sent = [payload for way, payload in frames if way == "Sent"]
        received = [payload for way, payload in frames if way == "Received"]
        self.assertTrue(any(_contains(f, "heartbeat") for f in received), "WELCOME not seen")
        self.assertTrue(any(_contains(f, '"eph"') for f in sent), "KEY_OFFER not seen")
        for way, payload in frames:
            for secret in (canary, canary[::-1]):
                self.assertFalse(
                    _contains(payload, secret), f"{way} frame holds {secret!r}: {payload!r}"
                )
        terminal_frames = 0
        for _, payload in frames:
            if len(payload) < 20:
                continue
            _, kind, _, _, _, _ = struct.unpack_from("!BBHIIQ", payload)
            if 0x20 <= kind <= 0x2F:
                terminal_frames += 1
                # u32(C) || u64(n) || ciphertext || 16-byte tag
                self.assertGreaterEqual(len(payload), 20 + 12 + 16, payload)
        self.assertGreater(terminal_frames, 10)

    async def stty_size(self, page: Page, command: str, end: str) -> tuple[int, int]:
        await page.type(command)
        screen = await page.wait_screen(f"^{end}", f"stty size output ({end})")
        found = re.findall(r"^(\d+) (\d+)\s*$", screen, re.M)
        self.assertTrue(found, screen)
        rows, cols = found[-1]
        return int(rows), int(cols)


async def grant_clipboard(page: Page, origin: str) -> None:
    """Let the page write and read the clipboard, as a person's browser does on a click."""
    await page.call(
        page.driver.execute_cdp_cmd,
        "Browser.grantPermissions",
        {"origin": origin, "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]},
    )


async def clipboard(page: Page) -> str:
    """What the clipboard holds."""
    text: str = await page.js("return navigator.clipboard.readText()")
    return text


async def terminal_fit(page: Page) -> dict[str, Any]:
    """
    How far the visible terminal's screen reaches past its pane's content box, at the
    bottom or the right (positive: clipped), and its size.
    """
    fit: dict[str, Any] = await page.js(
        "const pane = document.querySelector('.term-pane[aria-hidden=\"false\"]');"
        "const style = getComputedStyle(pane); const box = pane.getBoundingClientRect();"
        "const screen = pane.querySelector('.xterm-screen').getBoundingClientRect();"
        "const area = document.querySelector('#terminals').getBoundingClientRect();"
        "const t = window.coder1.current.term;"
        "return {over: Math.max(screen.bottom - (box.bottom - parseFloat(style.paddingBottom)),"
        " screen.right - (box.right - parseFloat(style.paddingRight)), box.bottom - area.bottom,"
        " box.right - area.right), cols: t.cols, rows: t.rows,"
        " screen: [screen.width, screen.height], pane: [box.width, box.height]};"
    )
    return fit


def tamper_next_output(relay: RelayService) -> Deferred[None]:
    """The relay flips one bit of the next PTY_OUTPUT frame it sends to the page's tabs."""
    done: Deferred[None] = Deferred()
    for connection in list(relay.context.connections.live):
        if not isinstance(connection, IDEProtocol):
            continue

        def send(payload: bytes, original: Any = connection.send) -> None:
            if not done.called and len(payload) > HEADER_SIZE and payload[1] == Kind.PTY_OUTPUT:
                payload = payload[:-1] + bytes([payload[-1] ^ 1])
                done.callback(None)
            original(payload)

        connection.send = send  # type: ignore[method-assign,assignment]
    return done


def _contains(payload: bytes, text: str) -> bool:
    """Whether C{text} is in C{payload} as UTF-8, UTF-16 or base64 (either alphabet)."""
    raw = text.encode()
    forms = [raw, text.encode("utf-16-le"), text.encode("utf-16-be")]
    for shift in range(3):
        # The part of base64(text) that does not depend on what comes before it.
        encoded = base64.b64encode(b"\0" * shift + raw)[4 if shift else 0 :][:-4]
        forms += [encoded, encoded.replace(b"+", b"-").replace(b"/", b"_")]
    return any(form in payload for form in forms)


async def _stop_coroutine(process: Any, collected: Collect) -> None:
    if process.pid:
        process.signalProcess("TERM")
    await collected.ended
    # A bridge stopped here never printed why it was refused: not an error of the test.
    collected.matched.addErrback(lambda _: None)


def _stop(process: Any, collected: Collect) -> Deferred[None]:
    return Deferred.fromCoroutine(_stop_coroutine(process, collected))
