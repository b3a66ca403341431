"""
C{coder1-bridge pair} and C{unpair}: redeem a code the IDE shows for a token
and pin the browser's key; revoke the token and forget it.

A code is checked here before it is sent: the relay counts every failed
redemption against the address (10 an hour, docs/security.md), so a typo
must not cost one.  Pairing again revokes the pairing it replaces, so that
its token stops working and the IDE stops listing it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, TextIO, TypeGuard

from twisted.python.filepath import FilePath

from coder1_bridge.config import BridgeConfig, RelayAddress
from coder1_bridge.output import Problem
from coder1_bridge.relay_api import RelayAnswer, RelayAPI
from coder1_bridge.relay_errors import describe_time
from coder1_wire.e2e import E2EError, Identity, b64u, check_public_key, unb64u

CODE_DIGITS = 6
_SEPARATORS = re.compile(r"[\s-]+")
_CODE = re.compile(rf"[0-9]{{{CODE_DIGITS}}}")
#: Failed redemptions the relay allows per address and hour (coder1_relay.pairing).
FAILURES_PER_HOUR = 10


def check_code(text: str) -> str:
    """
    The pairing code in C{text} (spaces and dashes allowed: C{123 456},
    C{123-456}), or L{Problem}: nothing malformed is sent to the relay.
    """
    code = _SEPARATORS.sub("", text)
    if not _CODE.fullmatch(code):
        shown = text.strip()
        what = f"“{shown}” is not a pairing code" if shown else "No pairing code was given"
        raise Problem(
            f"{what}: a code is the {CODE_DIGITS} digits the IDE shows, like 123 456. "
            "Nothing was sent to the relay."
        )
    return code


def _refused(answer: RelayAnswer, retry_after: str | None) -> Problem:
    """The relay refused a code: why, and what to do."""
    if answer.status == 429:
        seconds = int(retry_after) if retry_after and retry_after.isdigit() else 3600
        wait = f"{math.ceil(seconds / 60)} minutes" if seconds >= 90 else f"{seconds} seconds"
        return Problem(
            f"The relay refuses pairing attempts from this address for the next {wait}: too "
            f"many wrong codes were tried from it (it allows {FAILURES_PER_HOUR} an hour, to "
            "stop guessing). Nothing was paired; try again after that."
        )
    if answer.status == 403:
        return Problem(
            "The relay does not know that code: it was mistyped, used already, or older than "
            "5 minutes. Click “New code” in the IDE's pairing dialog and use the new one."
        )
    return Problem(f"The relay refused to pair: {answer.message}.")


def whole(value: object, low: int, high: int) -> TypeGuard[int]:
    """Whether C{value} is a whole number (not a bool) from C{low} up to, not including, C{high}."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value < high


async def pair(
    reactor: Any,
    directory: FilePath[str],
    relay: RelayAddress,
    code: str,
    label: str,
    out: TextIO,
    environ: Mapping[str, str],
    *,
    starting: bool = False,
) -> BridgeConfig:
    """
    Redeem C{code} at C{relay}, revoke the pairing it replaces, and save the
    new one (mode 0600).  C{starting}: C{start} paired, and goes on to run.
    """
    code = check_code(code)
    # One connection for both requests; none left open once pairing ends.
    async with RelayAPI(reactor, relay, environ) as api:
        answer = await api.call(b"POST", "/api/pair", body={"code": code, "label": label})
        if answer.status != 200:
            retry = answer.headers.getRawHeaders(b"retry-after")
            raise _refused(answer, retry[0].decode("latin-1") if retry else None)
        token, peer = answer.body.get("token"), answer.body.get("peer")
        if not isinstance(token, str) or not token:
            raise Problem("The relay sent no token; nothing was saved.")
        if not whole(peer, 1, 2**32):
            await api.call(b"DELETE", "/api/token", token=token)
            raise Problem("The relay sent no usable bridge number; nothing was saved.")
        try:
            browser_key = str(answer.body.get("browser_key"))
            check_public_key(unb64u(browser_key))
        except E2EError:
            await api.call(b"DELETE", "/api/token", token=token)
            raise Problem("The relay sent no usable browser key; nothing was saved.") from None
        await revoke_previous(reactor, directory, out, environ)
        # Our key goes out only now that we hold the browser's: a relay faking both
        # sides had to pick the key it gave us before seeing ours (docs/e2e.md).
        identity = Identity.generate()
        presented = await api.call(
            b"POST", "/api/pair/key", body={"bridge_key": b64u(identity.public_raw)}, token=token
        )
        if presented.status != 200:
            # Do not leave a half-paired bridge behind: it would count against the session's
            # limit and, having no key, never show up in the IDE to be revoked there.
            await api.call(b"DELETE", "/api/token", token=token)
            raise Problem(f"The relay refused to pair: {presented.message}.")
        config = BridgeConfig(relay, token, peer, browser_key, identity, label)
        config.save(directory)
    out.write(
        f"Paired with {relay.url} as bridge #{config.peer} ({label}); the pairing is valid "
        f"until {describe_time(answer.body.get('expires_at'))}.\n\n"
        f"    Verification code: {config.verification}\n\n"
        "Check that the IDE shows the same verification code. If it does not, someone may be\n"
        "intercepting the pairing: click “They differ” there, then pair again.\n"
    )
    if not starting:
        out.write(
            "\nRun the bridge with: coder1-bridge start\n"
            "Or have it start at every login: coder1-bridge service install\n"
        )
    out.flush()
    return config


async def revoke_previous(
    reactor: Any, directory: FilePath[str], out: TextIO, environ: Mapping[str, str]
) -> None:
    """Revoke the saved pairing's token before a new pairing replaces it."""
    saved = BridgeConfig.saved_token(directory)
    if saved is None:
        return
    relay, token, peer = saved
    try:
        async with RelayAPI(reactor, relay, environ) as api:
            answer = await api.call(b"DELETE", "/api/token", token=token)
    except Problem as e:
        out.write(
            f"The previous pairing (bridge #{peer} at {relay.url}) could not be revoked: {e} "
            "Revoke it from the IDE's bridge list.\n"
        )
        return
    if answer.status == 200:
        out.write(f"Revoked the previous pairing (bridge #{peer} at {relay.url}).\n")
    else:
        out.write(f"The previous pairing (bridge #{peer}) was no longer valid.\n")


async def unpair(
    reactor: Any, directory: FilePath[str], out: TextIO, environ: Mapping[str, str]
) -> None:
    """Revoke this bridge's token at the relay (if it can be reached), then forget it."""
    saved = BridgeConfig.saved_token(directory)
    if saved is None:
        out.write("This machine is not paired.\n")
        return
    relay, token, _ = saved
    try:
        async with RelayAPI(reactor, relay, environ) as api:
            answer = await api.call(b"DELETE", "/api/token", token=token)
        revoked, why = answer.status == 200, answer.message
    except Problem as e:
        revoked, why = False, str(e)
    if revoked:
        out.write("The relay revoked this bridge's token.\n")
    else:
        out.write(
            f"Could not revoke the token at the relay ({why}); revoke it from the IDE's "
            "bridge list.\n"
        )
    BridgeConfig.forget(directory)
    out.write(f"Forgot the pairing with {relay.url}.\n")
