"""
C{coder1-bridge}: pair with a relay, run, check, forget.

    coder1-bridge pair [--relay URL] [--ca-cert PEM] [--label NAME] [CODE]
    coder1-bridge start [--label NAME]
    coder1-bridge status
    coder1-bridge unpair
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from io import BytesIO
from typing import Any, TextIO

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.task import react
from twisted.logger import globalLogBeginner, textFileLogObserver
from twisted.python.filepath import FilePath
from twisted.web.client import Agent, FileBodyProducer, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from coder1_bridge.config import (
    DEFAULT_RELAY,
    BridgeConfig,
    RelayAddress,
    StalePairingError,
    config_dir,
    parse_relay_url,
    refuse_root,
)
from coder1_bridge.replay import ReplaySettings
from coder1_bridge.service import BridgeService, default_label
from coder1_wire.crash import telemetry_enabled
from coder1_wire.e2e import E2EError, Identity, b64u, check_public_key, unb64u
from coder1_wire.secretfile import InsecureFileError
from coder1_wire.tls import client_tls_options

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_REFUSED = 0, 1, 2, 3


class CLIError(Exception):
    """A failure to explain to the user in one line."""


@implementer(IPolicyForHTTPS)
class _RelayTrust:
    """Verifies the relay like the WebSocket does: TLS 1.3, hostname, given CA or system roots."""

    def __init__(self, ca_cert_pem: str | None) -> None:
        self.ca = ca_cert_pem.encode() if ca_cert_pem else None

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return client_tls_options(hostname.decode("idna"), self.ca)


async def call_relay(
    reactor: Any,
    relay: RelayAddress,
    method: bytes,
    path: str,
    *,
    body: dict[str, Any] | None = None,
    token: str | None = None,
) -> tuple[int, dict[str, Any]]:
    """One JSON request to the relay's API: (status, decoded body)."""
    headers = Headers({b"User-Agent": [b"coder1-bridge"]})
    if token is not None:
        headers.addRawHeader(b"Authorization", f"Bearer {token}".encode())
    producer = None
    if body is not None:
        headers.addRawHeader(b"Content-Type", b"application/json")
        producer = FileBodyProducer(BytesIO(json.dumps(body).encode()))
    agent = Agent(reactor, contextFactory=_RelayTrust(relay.ca_cert_pem))
    try:
        response = await agent.request(method, (relay.url + path).encode(), headers, producer)
        raw = await readBody(response)
    except (ConnectError, DNSLookupError) as e:
        raise CLIError(f"cannot reach the relay at {relay.url}: {e.__class__.__name__}") from None
    except Exception as e:
        raise CLIError(f"talking to the relay at {relay.url} failed: {_describe(e)}") from None
    try:
        decoded = json.loads(raw)
    except (ValueError, RecursionError):
        decoded = {}
    return response.code, decoded if isinstance(decoded, dict) else {}


def _describe(error: Exception) -> str:
    reasons = getattr(error, "reasons", None)
    if reasons:
        return "; ".join(str(r.value) for r in reasons)
    return str(error) or error.__class__.__name__


async def pair(
    reactor: Any, directory: FilePath[str], relay: RelayAddress, code: str, label: str, out: TextIO
) -> BridgeConfig:
    """Redeem C{code} at C{relay} and save the pairing (mode 0600)."""
    code = code.strip().replace(" ", "").replace("-", "")
    status, body = await call_relay(
        reactor, relay, b"POST", "/api/pair", body={"code": code, "label": label}
    )
    if status != 200:
        raise CLIError(f"pairing refused: {body.get('message', f'HTTP {status}')}")
    token = str(body["token"])
    try:
        browser_key = str(body.get("browser_key"))
        check_public_key(unb64u(browser_key))
    except E2EError:
        await call_relay(reactor, relay, b"DELETE", "/api/token", token=token)
        raise CLIError("the relay sent no usable browser key; nothing was saved") from None
    # Our key goes out only now that we hold the browser's: a relay faking both
    # sides had to pick the key it gave us before seeing ours (docs/e2e.md).
    identity = Identity.generate()
    status, answer = await call_relay(
        reactor,
        relay,
        b"POST",
        "/api/pair/key",
        body={"bridge_key": b64u(identity.public_raw)},
        token=token,
    )
    if status != 200:
        # Do not leave a half-paired bridge behind: it would count against the session's
        # limit and, having no key, never show up in the IDE to be revoked there.
        await call_relay(reactor, relay, b"DELETE", "/api/token", token=token)
        raise CLIError(f"pairing refused: {answer.get('message', f'HTTP {status}')}")
    config = BridgeConfig(relay, token, int(body["peer"]), browser_key, identity)
    config.save(directory)
    out.write(
        f"Paired with {relay.url} as bridge #{config.peer} ({label}); the pairing is valid "
        f"until {_when(body['expires_at'])}.\n\n"
        f"    Verification code: {config.verification}\n\n"
        "Check that the IDE shows the same verification code. If it does not, someone may be\n"
        "intercepting the pairing: run `coder1-bridge unpair` and pair again.\n\n"
        "Run the bridge with: coder1-bridge start\n"
    )
    return config


async def status(reactor: Any, directory: FilePath[str], out: TextIO) -> int:
    """Say whether this machine is paired, to which relay, and whether the relay accepts it."""
    config = BridgeConfig.load(directory)
    if config is None:
        out.write("Not paired. Pair with: coder1-bridge pair CODE\n")
        return EXIT_FAILED
    out.write(
        f"Paired with {config.relay.url} as bridge #{config.peer}; "
        f"verification code {config.verification}.\n"
    )
    code, body = await call_relay(reactor, config.relay, b"GET", "/api/token", token=config.token)
    if code == 200:
        out.write(
            f"The relay accepts this bridge's token (valid until {_when(body['expires_at'])}).\n"
        )
        return EXIT_OK
    out.write(f"The relay refuses this bridge's token: {body.get('message', f'HTTP {code}')}.\n")
    return EXIT_REFUSED


async def unpair(reactor: Any, directory: FilePath[str], out: TextIO) -> int:
    """Revoke this bridge's token at the relay (if it can be reached), then forget it."""
    config = BridgeConfig.load(directory)
    if config is None:
        out.write("Not paired.\n")
        return EXIT_OK
    try:
        code, body = await call_relay(
            reactor, config.relay, b"DELETE", "/api/token", token=config.token
        )
    except CLIError as e:
        code, body = 0, {"message": str(e)}
    if code == 200:
        out.write("The relay revoked this bridge's token.\n")
    else:
        out.write(
            f"Could not revoke the token at the relay ({body.get('message', f'HTTP {code}')}); "
            "revoke it from the IDE's bridge list.\n"
        )
    BridgeConfig.forget(directory)
    out.write(f"Forgot the pairing with {config.relay.url}.\n")
    return EXIT_OK


async def start(
    reactor: Any,
    config: BridgeConfig,
    label: str,
    out: TextIO,
    replay: ReplaySettings | None = None,
) -> int:
    """Run the bridge until interrupted, or until the relay refuses its token."""
    service = BridgeService(
        reactor, config, telemetry=telemetry_enabled(os.environ), label=label, replay=replay
    )
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    out.write(f"coder1-bridge connecting to {config.relay.url} (Ctrl-C to stop)\n")
    reason = await service.refused
    await service.stopService()
    out.write(f"The relay refused this bridge: {reason}. Pair again: coder1-bridge pair CODE\n")
    return EXIT_REFUSED


def _when(timestamp: Any) -> str:
    return datetime.fromtimestamp(float(timestamp), UTC).strftime("%Y-%m-%d %H:%M UTC")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coder1-bridge", description="Run the Coder1 IDE's commands on this machine."
    )
    parser.add_argument("--config-dir", help="where the pairing is kept (default: XDG config dir)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pair", help="pair with a relay using the code the IDE shows")
    p.add_argument("code", nargs="?", help="the 6-digit code (prompted for when left out)")
    s = sub.add_parser("start", help="connect and run commands (pairs first if needed)")
    for command in (p, s):
        command.add_argument(
            "--relay",
            default=DEFAULT_RELAY,
            help=f"relay URL to pair with (default {DEFAULT_RELAY})",
        )
        command.add_argument(
            "--ca-cert", help="PEM file to trust for the relay (dev or self-hosted)"
        )
        command.add_argument("--label", default=default_label(), help="name shown in the IDE")
    add_replay_arguments(s)
    sub.add_parser("status", help="show the pairing and whether the relay accepts it")
    sub.add_parser("unpair", help="forget the pairing")
    return parser


def add_replay_arguments(parser: argparse.ArgumentParser) -> None:
    """C{--replay-buffer}, C{--send-window}, C{--grace-period} (docs/protocol.md, 5.7)."""
    defaults = ReplaySettings()
    parser.add_argument(
        "--replay-buffer",
        type=int,
        default=defaults.capacity,
        help="bytes of output kept per command or terminal for a page that comes back "
        f"(default {defaults.capacity})",
    )
    parser.add_argument(
        "--send-window",
        type=int,
        default=defaults.window,
        help=f"bytes of one stream in flight to one tab (default {defaults.window})",
    )
    parser.add_argument(
        "--grace-period",
        type=float,
        default=defaults.grace,
        help="seconds without any browser tab before terminals and commands are stopped; "
        f"0: never (default {defaults.grace:g})",
    )


def replay_settings(args: argparse.Namespace) -> ReplaySettings:
    try:
        return ReplaySettings(args.replay_buffer, args.send_window, args.grace_period)
    except ValueError as e:
        raise CLIError(f"bad replay option: {e}") from None


def _relay_address(args: argparse.Namespace) -> RelayAddress:
    try:
        url = parse_relay_url(args.relay)
    except ValueError as e:
        raise CLIError(str(e)) from None
    ca = None
    if args.ca_cert:
        try:
            ca = FilePath(args.ca_cert).getContent().decode("ascii")
        except (OSError, UnicodeDecodeError) as e:
            raise CLIError(f"cannot read --ca-cert: {e}") from None
    return RelayAddress(url, ca)


def run(argv: Sequence[str], *, reactor: Any, out: TextIO, prompt: Any = input) -> Deferred[int]:
    """Do what C{argv} says; the result is the exit code."""
    args = _parser().parse_args(argv)
    directory = FilePath(args.config_dir) if args.config_dir else config_dir()

    async def go() -> int:
        try:
            if args.command == "pair":
                relay = _relay_address(args)
                code = args.code or prompt("Pairing code shown in the IDE: ")
                await pair(reactor, directory, relay, code, args.label, out)
                return EXIT_OK
            if args.command == "status":
                return await status(reactor, directory, out)
            if args.command == "unpair":
                return await unpair(reactor, directory, out)
            config = BridgeConfig.load(directory)
            if config is None:
                out.write("Not paired yet.\n")
                code = prompt("Pairing code shown in the IDE: ")
                config = await pair(reactor, directory, _relay_address(args), code, args.label, out)
            return await start(reactor, config, args.label, out, replay_settings(args))
        except (CLIError, InsecureFileError, StalePairingError) as e:
            out.write(f"coder1-bridge: {e}\n")
            return EXIT_FAILED

    return Deferred.fromCoroutine(go())


def main(argv: Sequence[str] | None = None) -> None:
    """The console script."""
    refuse_root(os.geteuid())
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["start"]:
        globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)])

    def once(reactor: Any) -> Deferred[None]:
        d = run(argv, reactor=reactor, out=sys.stdout)

        def exit_with(code: int) -> None:
            if code:
                raise SystemExit(code)

        return d.addCallback(exit_with)

    react(once)
