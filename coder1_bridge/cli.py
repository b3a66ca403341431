"""
C{coder1-bridge}: pair with a relay, run, check, forget; run at login; diagnose.

    coder1-bridge pair [--relay URL] [--ca-cert PEM] [--label NAME] [CODE]
    coder1-bridge start [--label NAME] [--verbose] [--replay-buffer ...]
    coder1-bridge status
    coder1-bridge unpair
    coder1-bridge doctor [--relay URL] [--ca-cert PEM]
    coder1-bridge service install|uninstall|status
    coder1-bridge telemetry

This module reads the command line, asks what must be asked before the
reactor runs (a pairing code), and hands over to the module of each
command.  No traceback reaches the person: a failure is a sentence or two
(L{Problem}) on stderr and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, TextIO

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.error import ReactorNotRunning
from twisted.logger import Logger, globalLogBeginner
from twisted.python.filepath import FilePath

from coder1_bridge import foreground
from coder1_bridge.config import (
    DEFAULT_RELAY,
    BridgeConfig,
    RelayAddress,
    StalePairingError,
    config_dir,
    parse_relay_url,
    refuse_root,
)
from coder1_bridge.output import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    ForegroundObserver,
    Problem,
    detailed_observer,
)
from coder1_bridge.replay import ReplaySettings
from coder1_bridge.service import default_label
from coder1_wire.secretfile import InsecureFileError

_log = Logger()
CODE_PROMPT = "Pairing code shown in the IDE: "
#: Said when the CLI itself failed unexpectedly.
CRASHED = (
    "something went wrong inside coder1-bridge. Run it again with --verbose to see what, "
    "and please report it."
)


@attrs.frozen
class Console:
    """How the CLI asks the person something: C{ask} raises EOFError at the end of input."""

    ask: Callable[[str], str]
    interactive: bool


def terminal_console(stdin: TextIO, out: TextIO) -> Console:
    """Questions on the terminal (or whatever stdin is), asked before the reactor runs."""

    def ask(prompt: str) -> str:
        out.write(prompt)
        out.flush()
        line = stdin.readline()
        if not line:
            out.write("\n")
            raise EOFError
        return line

    return Console(ask, stdin.isatty())


def _no_input(prompt: str) -> str:
    raise EOFError


def _parser() -> argparse.ArgumentParser:
    # Accepted before the subcommand and after it; SUPPRESS keeps the one given.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config-dir",
        default=argparse.SUPPRESS,
        help="where the pairing is kept (default: ~/.config/coder1-bridge)",
    )
    common.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        default=argparse.SUPPRESS,
        help="log everything, with timestamps (what the daemon's log keeps)",
    )
    parser = argparse.ArgumentParser(
        prog="coder1-bridge",
        description="Run the Coder1 IDE's terminals and commands on this machine.",
        parents=[common],
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("pair", parents=[common], help="pair with the code the IDE shows")
    p.add_argument("code", nargs="?", help="the 6-digit code (asked for when left out)")
    s = sub.add_parser(
        "start", parents=[common], help="connect and run terminals (pairs first if need be)"
    )
    d = sub.add_parser("doctor", parents=[common], help="check what the bridge needs, step by step")
    for command in (p, s, d):
        command.add_argument(
            "--relay",
            default=None,
            help=f"the relay's URL (default: the paired relay, else {DEFAULT_RELAY})",
        )
        command.add_argument(
            "--ca-cert",
            metavar="PEM",
            help="the relay's certificate to trust (a development or self-hosted relay)",
        )
    for command in (p, s):
        command.add_argument(
            "--label", default=None, help="name shown in the IDE (default: host name)"
        )
    add_replay_arguments(s)
    sub.add_parser(
        "status",
        parents=[common],
        help="the pairing, the running bridge, and whether the relay accepts it",
    )
    sub.add_parser("unpair", parents=[common], help="revoke the token and forget the pairing")
    sub.add_parser(
        "telemetry",
        parents=[common],
        help="whether telemetry is on, what it sends, and the crash reports sent",
    )
    svc = sub.add_parser("service", parents=[common], help="run the bridge at every login")
    svc.add_argument(
        "action",
        choices=["install", "uninstall", "status"],
        help="install (and start), uninstall (and stop), or show the service",
    )
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


def _replay_settings(args: argparse.Namespace) -> ReplaySettings:
    try:
        return ReplaySettings(args.replay_buffer, args.send_window, args.grace_period)
    except ValueError as e:
        raise Problem(f"Bad replay option: {e}.") from None


def _relay_address(args: argparse.Namespace) -> RelayAddress:
    try:
        url = parse_relay_url(args.relay or DEFAULT_RELAY)
    except ValueError as e:
        raise Problem(f"{str(e).capitalize()}.") from None
    ca = None
    if args.ca_cert:
        path = FilePath(os.path.expanduser(args.ca_cert))
        try:
            ca = path.getContent().decode("ascii")
        except (OSError, UnicodeDecodeError):
            raise Problem(
                f"Cannot read the certificate {path.path} (--ca-cert): give the relay's "
                "certificate file, such as ~/.local/state/coder1-relay/dev-cert.pem."
            ) from None
    return RelayAddress(url, ca)


def _directory(args: argparse.Namespace, environ: Mapping[str, str]) -> FilePath[str]:
    given = getattr(args, "config_dir", None)
    return FilePath(os.path.abspath(os.path.expanduser(given))) if given else config_dir(environ)


def _load(directory: FilePath[str]) -> BridgeConfig | None:
    try:
        return BridgeConfig.load(directory)
    except (InsecureFileError, StalePairingError) as e:
        raise Problem(f"{e}.") from None


def prepare(
    args: argparse.Namespace, console: Console, out: TextIO, environ: Mapping[str, str]
) -> None:
    """
    Ask what must be asked before the reactor runs: a pairing code (the
    reactor would keep Ctrl-C from interrupting a question).  Puts it in
    C{args.code}.
    """
    if args.command == "pair":
        from coder1_bridge import pairing

        args.code = pairing.check_code(args.code) if args.code is not None else None
        if args.code is None:
            args.code = _code_from(console, out)
    elif args.command == "start" and _load(_directory(args, environ)) is None:
        if not console.interactive:
            raise Problem(
                "This machine is not paired yet, and there is no terminal to ask for a pairing "
                "code on. Pair it first: coder1-bridge pair CODE"
            )
        out.write(
            "This machine is not paired yet. In the IDE, click “Bridge”: it shows a pairing "
            "code to type here.\n"
        )
        args.code = _code_from(console, out)


def _code_from(console: Console, out: TextIO) -> str:
    from coder1_bridge import pairing

    while True:
        try:
            text = console.ask(CODE_PROMPT)
        except EOFError:
            raise Problem(
                "No pairing code was given. In the IDE, click “Bridge”, then run: "
                "coder1-bridge pair CODE"
            ) from None
        try:
            return pairing.check_code(text)
        except Problem as e:
            if not console.interactive:
                raise
            out.write(f"{e}\n")


async def dispatch(
    args: argparse.Namespace, reactor: Any, out: TextIO, environ: Mapping[str, str]
) -> int:
    """Run the command C{args} name (after L{prepare}); its exit status."""
    # Each command's module is imported for it only: a running bridge (start) does not
    # keep the others' imports (the relay API's HTTP client among them: about 1 MiB).
    directory = _directory(args, environ)
    command = args.command
    if command == "start":
        replay = _replay_settings(args)
        config = _load(directory)
        if config is None:
            from coder1_bridge import pairing

            relay = _relay_address(args)
            label = args.label or default_label()
            config = await pairing.pair(
                reactor, directory, relay, args.code, label, out, environ, starting=True
            )
        label = args.label or config.label or default_label()
        return await foreground.start(reactor, directory, config, label, replay, out, environ)
    if command in ("pair", "unpair"):
        from coder1_bridge import pairing

        if command == "unpair":
            await pairing.unpair(reactor, directory, out, environ)
            return EXIT_OK
        label = args.label or default_label()
        relay = _relay_address(args)
        await pairing.pair(reactor, directory, relay, args.code, label, out, environ)
        return EXIT_OK
    if command == "status":
        from coder1_bridge import status

        return await status.status(reactor, directory, out, environ)
    if command == "telemetry":
        from coder1_bridge import telemetry_report

        return await telemetry_report.telemetry(reactor, directory, out, environ)
    if command == "doctor":
        from coder1_bridge import doctor

        checks = doctor.Doctor(reactor, directory, environ, out)
        if args.relay or args.ca_cert:
            checks.relay = _relay_address(args)
        return await checks.run()
    from coder1_bridge import service_install

    where = service_install.platform(environ)
    if args.action == "install":
        return await service_install.install(reactor, directory, out, environ, where)
    if args.action == "uninstall":
        return await service_install.uninstall(reactor, out, environ, where)
    return await service_install.service_status(reactor, out, environ, where)


def run(
    argv: Sequence[str],
    *,
    reactor: Any,
    out: TextIO,
    err: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
    console: Console | None = None,
) -> Deferred[int]:
    """
    Do what C{argv} says, asking C{console} if need be (by default there is
    nobody to ask); the result is the exit status.
    """
    err = out if err is None else err
    environ = os.environ if environ is None else environ
    args = _parser().parse_args(argv)

    async def go() -> int:
        prepare(args, console or Console(_no_input, interactive=False), out, environ)
        return await dispatch(args, reactor, out, environ)

    return Deferred.fromCoroutine(_said(go(), err))


async def _said(work: Coroutine[Any, Any, int], err: TextIO) -> int:
    """The exit status of C{work}, with its L{Problem}, if any, said on C{err}."""
    try:
        return await work
    except (InsecureFileError, StalePairingError) as e:
        err.write(f"coder1-bridge: {e}.\n")
        return EXIT_FAILED
    except Problem as e:
        err.write(f"coder1-bridge: {e}\n")
        return EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> None:
    """The console script: exits with the command's status, never with a traceback."""
    try:
        code = _main(sys.argv[1:] if argv is None else list(argv))
    except KeyboardInterrupt:
        sys.stdout.write("\nInterrupted.\n")
        code = EXIT_INTERRUPTED
    sys.exit(code)


def _main(argv: list[str]) -> int:
    refuse_root(os.geteuid())
    args = _parser().parse_args(argv)
    environ = os.environ
    observer = (
        detailed_observer(sys.stdout, environ)
        if getattr(args, "verbose", False)
        else ForegroundObserver(sys.stdout)
    )
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    try:
        prepare(args, terminal_console(sys.stdin, sys.stdout), sys.stdout, environ)
    except Problem as e:
        sys.stderr.write(f"coder1-bridge: {e}\n")
        return EXIT_FAILED

    return _react(lambda reactor: _said(dispatch(args, reactor, sys.stdout, environ), sys.stderr))


def _react(work: Callable[[Any], Any]) -> int:
    """
    Run C{work} with the reactor: its exit status; or, if a signal stopped
    the reactor first (Ctrl-C in the middle of a request), 130.
    """
    from twisted.internet import reactor

    running: Any = reactor
    result: list[int] = []

    def begin() -> None:
        d = Deferred.fromCoroutine(work(running))

        def crashed(failure: Any) -> int:
            _log.failure("coder1-bridge failed", failure)
            sys.stderr.write(f"coder1-bridge: {CRASHED}\n")
            return EXIT_FAILED

        def stop(code: int) -> None:
            result.append(code)
            with contextlib.suppress(ReactorNotRunning):
                running.stop()

        d.addErrback(crashed).addCallback(stop)

    running.callWhenRunning(begin)
    running.run()
    if not result:
        sys.stdout.write("\nInterrupted.\n")
        return EXIT_INTERRUPTED
    return result[0]
