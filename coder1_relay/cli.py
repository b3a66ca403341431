"""
C{coder1-relay}: an operator's commands beside C{twistd coder1-relay}.

    coder1-relay telemetry [--state-dir DIR | --store URL ...] [--hours N]

Prints the relay's telemetry as a readable summary (L{telemetry_summary}).
Errors are one sentence that says what to do, exit status 1.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import react
from twisted.python.failure import Failure

from coder1_relay import telemetry_summary
from coder1_relay.certs import default_state_dir
from coder1_relay.redis_settings import DEFAULT_PREFIX, settings_from_options
from coder1_relay.service import home_relative


class Problem(Exception):
    """What went wrong, as one sentence for a person."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="coder1-relay", description="An operator's commands.")
    commands = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    telemetry = commands.add_parser(
        "telemetry",
        help="print the relay's telemetry: counts, versions, crash reports, retention",
        description="Print the relay's telemetry as a summary (it holds no content).",
    )
    telemetry.add_argument("--state-dir", help="the relay's --state-dir (default: its default)")
    telemetry.add_argument("--store", help="the relay processes' shared --store redis://...")
    telemetry.add_argument("--store-ca", help="as for the relay")
    telemetry.add_argument("--store-password-file", help="as for the relay")
    telemetry.add_argument("--store-prefix", default=DEFAULT_PREFIX, help="as for the relay")
    telemetry.add_argument(
        "--hours", type=int, default=24, help="hours shown one by one (default 24)"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    options = parser().parse_args(argv)
    if options.store is not None:
        react(_redis_main, [options])  # exits
    try:
        text = _from_sqlite(options)
    except Problem as e:
        sys.stderr.write(f"coder1-relay: {e}\n")
        return 1
    sys.stdout.write(text)
    return 0


def _redis_main(reactor: Any, options: argparse.Namespace) -> Deferred[None]:
    def failed(failure: Failure) -> None:
        failure.trap(Problem)
        sys.stderr.write(f"coder1-relay: {failure.value}\n")
        raise SystemExit(1)

    return _from_redis(reactor, options).addCallbacks(sys.stdout.write, failed)


def _from_sqlite(options: argparse.Namespace) -> str:
    state = options.state_dir or default_state_dir().path
    path = f"{state.rstrip('/')}/telemetry.sqlite"
    shown = home_relative(path)
    try:
        summary = telemetry_summary.from_sqlite(path, shown)
    except FileNotFoundError:
        raise Problem(
            f"There is no telemetry at {shown}. Give the relay's --state-dir, "
            "or --store for relay processes that share Redis."
        ) from None
    except PermissionError:
        raise Problem(f"Cannot read {shown}: run this as the relay's user.") from None
    except sqlite3.Error:
        raise Problem(f"{shown} is not a relay's telemetry database.") from None
    return telemetry_summary.render(summary, hours=options.hours)


def _from_redis(reactor: Any, options: argparse.Namespace) -> Deferred[str]:
    from coder1_relay.redis_client import RedisClient
    from coder1_relay.store import StoreUnavailable

    try:
        settings = settings_from_options(
            options.store,
            ca_file=options.store_ca,
            password_file=options.store_password_file,
            prefix=options.store_prefix,
        )
    except ValueError as e:
        return fail(Problem(f"{e}."))
    client = RedisClient(reactor, settings)

    async def read() -> str:
        client.startService()
        try:
            await client.when_ready().addTimeout(settings.timeout, reactor)
            where = f"{settings.address} (prefix {settings.prefix})"
            summary = await telemetry_summary.from_redis(client, where)
        except Exception as e:
            reason = str(e) if isinstance(e, StoreUnavailable) else "no answer"
            raise Problem(
                f"Cannot read telemetry from {settings.address} ({reason}). "
                "Check that Redis runs and the --store options match the relay's."
            ) from None
        finally:
            await client.stopService()
        return telemetry_summary.render(summary, hours=options.hours)

    return Deferred.fromCoroutine(read())
