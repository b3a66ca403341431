"""
The whole flow in a real headless Chromium, against a real relay and a real
bridge started as C{coder1-bridge} subprocesses, the way a person does it.

Screenshots of each step land in C{_trial_temp/browser-artifacts/}.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SkipTest, TestCase

from .loopback import reactor, settle, start_relay, stop_all
from .test_cli import Collect, spawn

T = TypeVar("T")
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


class Page:
    """A Chromium page driven from a thread, so the reactor keeps serving it."""

    def __init__(self, driver: Any) -> None:
        self.driver = driver

    def call(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        return deferToThread(f, *args)

    def js(self, script: str, *args: Any) -> Deferred[Any]:
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

    async def wait_screen(self, pattern: str, what: str) -> str:
        """Wait until the visible terminal shows a line matching C{pattern}."""
        text: str = await self.wait(
            "const t = document.querySelector('.term-pane[aria-hidden=\"false\"] .xterm-rows');"
            "return t && new RegExp(arguments[0], 'm').test(t.innerText) && t.innerText;",
            pattern,
            what=what,
        )
        return text

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
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = await deferToThread(
            webdriver.Chrome, service=Service(CHROMEDRIVER), options=options
        )
        self.addCleanup(lambda: deferToThread(driver.quit))
        return Page(driver)

    async def test_pair_and_use_a_terminal(self) -> None:
        """
        Open the page, click Bridge, pair with the code shown, see the bridge
        connected, type in a terminal and see the output, resize and see
        C{stty size} follow, exit, and revoke the bridge.
        """
        self.addCleanup(lambda: Deferred.fromCoroutine(settle()))
        relay = await start_relay(FilePath(self.mktemp()))
        self.addCleanup(lambda: Deferred.fromCoroutine(stop_all(relay)))
        url = relay.context.public_url
        ca = FilePath(self.mktemp())
        ca.setContent(relay.keys.tls_cert_pem)
        page = await self.start_browser(spki_pin(relay.keys.tls_cert_pem))

        await page.call(page.driver.get, url + "/")
        await page.wait(
            "return document.querySelector('#connection-state').dataset.state === 'connected'",
            what="the IDE connection",
        )
        await page.shot("01-page")

        await page.click("#bridge-button")
        code = await page.wait(
            "const c = document.querySelector('#pair-code');"
            "return c.dataset.state === 'live' && c.dataset.code;",
            what="a pairing code",
        )
        command = await page.js("return document.querySelector('#pair-command').textContent")
        self.assertEqual(command, f"coder1-bridge pair --relay {url} {code}")
        self.assertRegex(
            await page.js("return document.querySelector('#pair-countdown').textContent"),
            r"Expires in 4:5\d|Expires in 5:00",
        )
        await page.shot("02-code")

        env = {"XDG_CONFIG_HOME": FilePath(self.mktemp()).path, "SHELL": "/bin/bash"}
        pairing = Collect()
        spawn(pairing, [BRIDGE, "pair", "--relay", url, "--ca-cert", ca.path, code], env)
        self.assertEqual(await pairing.ended, 0, pairing.output)

        bridge = Collect(r"refused this bridge: (.*)\.")
        process = spawn(bridge, [BRIDGE, "start"], env)
        self.addCleanup(lambda: _stop(process, bridge))
        await page.wait(
            "return !document.querySelector('#pair-dialog').open"
            " && document.querySelector('.bridge[data-state=\"connected\"]')",
            what="the dialog to close and the bridge to show as connected",
        )
        self.assertIn(
            "connected since",
            await page.js("return document.querySelector('.bridge .state').textContent"),
        )
        await page.shot("03-connected")

        await page.wait(
            "return !document.querySelector('#new-terminal').disabled", what="+ Terminal"
        )
        await page.click("#new-terminal")
        await page.wait_screen(r"[$#] *$", "a shell prompt")
        await page.type("echo hello-$((6*7))-x\n")
        await page.wait_screen(r"^hello-42-x", "the command's output in the terminal")
        await page.shot("04-output")

        await page.type("sleep 100\n")
        await page.ctrl("c")
        await page.type("echo after-$((2+2))\n")
        await page.wait_screen(r"^after-4", "Ctrl-C to stop sleep and the shell to answer")

        await page.click("#new-terminal")
        await page.wait_screen(r"[$#] *$", "a prompt in a second terminal")
        await page.type("echo second-$((1+1))\n")
        await page.wait_screen(r"^second-2", "the second terminal's output")
        self.assertEqual(await page.js("return document.querySelectorAll('.tab').length"), 2)
        await page.click(".tab")
        await page.wait_screen(r"^hello-42-x", "the first terminal, unchanged, on its tab")
        await page.shot("05-two-terminals")

        await page.call(page.driver.refresh)
        await page.wait(
            "return document.querySelectorAll('.tab').length === 2",
            what="the page to re-attach to both running terminals after a reload",
        )
        await page.click(".tab")
        await page.type("echo again-$((5*5))\n")
        await page.wait_screen(r"^again-25", "typing in a re-attached terminal")
        await page.shot("06-reattached")

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
        await page.shot("07-resized")

        await page.type("exit\n")
        await page.wait(
            "return document.querySelector('.tab[aria-selected=\"true\"]').dataset.state"
            " === 'exited'",
            what="the terminal to close",
        )
        await page.shot("08-exited")

        await page.click(".bridge .revoke")
        await page.click(".bridge .revoke")
        match = await bridge.matched
        self.assertIn(b"revoked", match.group(1))
        self.assertEqual(await bridge.ended, 3)
        await page.wait(
            "return document.querySelectorAll('.bridge').length === 0", what="the bridge to go"
        )
        await page.shot("09-revoked")

    async def stty_size(self, page: Page, command: str, end: str) -> tuple[int, int]:
        await page.type(command)
        screen = await page.wait_screen(f"^{end}", f"stty size output ({end})")
        found = re.findall(r"^(\d+) (\d+)\s*$", screen, re.M)
        self.assertTrue(found, screen)
        rows, cols = found[-1]
        return int(rows), int(cols)


async def _stop_coroutine(process: Any, collected: Collect) -> None:
    if process.pid:
        process.signalProcess("TERM")
    await collected.ended


def _stop(process: Any, collected: Collect) -> Deferred[None]:
    return Deferred.fromCoroutine(_stop_coroutine(process, collected))
