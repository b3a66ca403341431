"""
Why the relay cannot start, in one line each: a listening endpoint it cannot
use, a file it cannot read or write.

L{check_endpoint} runs in C{makeService}, before twistd detaches a daemon, so
that a bad C{--listen} is said on the terminal that started it; the relay's
real listen (after that) says the same through L{listen_failure}.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator
from typing import Any

from twisted.internet.endpoints import (
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
    UNIXServerEndpoint,
    serverFromString,
)
from twisted.internet.error import CannotListenError
from twisted.python.filepath import FilePath

from coder1_wire.secretfile import InsecureFileError
from coder1_wire.twistd_errors import CannotStart

#: What a good endpoint looks like, for the message about a bad one.
ENDPOINT_EXAMPLES = "tcp:8443, unix:/run/coder1-relay.sock or systemd:domain=INET6:index=0"


def check_endpoint(reactor: Any, description: str, option: str) -> None:
    """
    Parse C{description}; for a TCP port try binding it (and its address), and for
    a UNIX socket check its directory, so that a port in use, an address not
    on this machine or a missing directory is said before the relay starts.

    @raise CannotStart: naming C{option}, the endpoint and the reason.
    """
    try:
        endpoint = serverFromString(reactor, description)
    except Exception as e:  # each endpoint type's parser raises its own kind
        raise CannotStart(_cannot(description, option, _parse_reason(description, e))) from None
    if isinstance(endpoint, TCP4ServerEndpoint | TCP6ServerEndpoint):
        family = socket.AF_INET6 if isinstance(endpoint, TCP6ServerEndpoint) else socket.AF_INET
        interface = endpoint._interface or ("::" if family == socket.AF_INET6 else "")
        probe = socket.socket(family, socket.SOCK_STREAM)
        try:
            # As Twisted's own listening sockets: a port in TIME_WAIT is free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((interface, endpoint._port))
        except OSError as e:
            reason = socket_reason(e, endpoint._port, interface)
            raise CannotStart(_cannot(description, option, reason)) from None
        finally:
            probe.close()
    if isinstance(endpoint, UNIXServerEndpoint):
        folder = os.path.dirname(os.path.abspath(endpoint._address)) or "/"
        if not os.path.isdir(folder):
            raise CannotStart(_cannot(description, option, f"there is no directory {folder}"))
        if not os.access(folder, os.W_OK | os.X_OK):
            reason = f"this user (uid {os.getuid()}) may not create files in {folder}"
            raise CannotStart(_cannot(description, option, reason))


def listen_failure(description: str, option: str, error: BaseException) -> CannotStart:
    """The one line for a listen on C{description} that failed with C{error}."""
    if isinstance(error, CannotListenError):
        inner = error.socketError
        if isinstance(inner, OSError):
            return CannotStart(
                _cannot(description, option, socket_reason(inner, error.port, error.interface))
            )
        return CannotStart(_cannot(description, option, str(inner)))
    if isinstance(error, OSError):
        return CannotStart(_cannot(description, option, socket_reason(error, None, "")))
    return CannotStart(_cannot(description, option, _parse_reason(description, error)))


def _cannot(description: str, option: str, reason: str) -> str:
    return f"Cannot listen on {description} ({option}): {reason}."


def _parse_reason(description: str, error: BaseException) -> str:
    kind = description.split(":", 1)[0]
    text = str(error)
    if text.startswith("Unknown endpoint type"):
        return f"“{kind}” is not an endpoint type; use one such as {ENDPOINT_EXAMPLES}"
    if "invalid literal for int()" in text:
        return "the port is not a number"
    if kind == "systemd" and isinstance(error, IndexError | KeyError):
        return (
            "systemd passed no such socket (LISTEN_FDS): start the relay through its .socket "
            "unit (contrib/systemd)"
        )
    return f"not a usable endpoint ({text}); use one such as {ENDPOINT_EXAMPLES}"


def socket_reason(error: OSError, port: int | None, interface: str) -> str:
    """Why a socket could not be bound, in words, with what to do."""
    where = f"port {port}" if port else "the port"
    if error.errno == errno.EADDRINUSE:
        return f"{where} is in use by another program; stop it or choose another port"
    if error.errno in (errno.EACCES, errno.EPERM):
        return (
            f"{where} is below 1024 and needs privileges; use systemd socket activation "
            "(contrib/systemd) or a port above 1023"
        )
    if error.errno == errno.EADDRNOTAVAIL:
        return f"this machine has no address {interface}; check the interface= part"
    return (error.strerror or str(error)).lower()


def _chain(error: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def file_failure(
    error: BaseException,
    *,
    state_dir: FilePath[str],
    tls_cert: FilePath[str] | None,
    tls_key: FilePath[str] | None,
) -> CannotStart | None:
    """
    The one line for a file the relay could not use while it loaded or made
    its keys and state (C{error}, raised by C{RelayService}); None if C{error}
    is not about a file.
    """
    from coder1_relay.service import home_relative as _shown  # service imports this module

    for each in _chain(error):
        if isinstance(each, InsecureFileError):
            return CannotStart(f"Cannot use {_shown(each.path)}: {_lower_first(str(each))}.")
        if isinstance(each, OSError) and each.filename:
            path = os.fsdecode(each.filename)
            what, option = _role(path, state_dir, tls_cert, tls_key)
            reason = _file_reason(each)
            return CannotStart(f"Cannot use {what} {_shown(path)}{option}: {reason}.")
    if isinstance(error, ValueError):
        # certs' messages name the file already (not PEM, key and certificate differ, ...).
        return CannotStart(f"Cannot start: {error}.")
    return None


def _role(
    path: str,
    state_dir: FilePath[str],
    tls_cert: FilePath[str] | None,
    tls_key: FilePath[str] | None,
) -> tuple[str, str]:
    """What C{path} is to the relay, and the option that named it."""
    if tls_cert is not None and path == tls_cert.path:
        return "the TLS certificate", " (--tls-cert)"
    if tls_key is not None and path == tls_key.path:
        return "the TLS key", " (--tls-key)"
    here = FilePath(path)
    if here == state_dir:
        return "the state directory", " (--state-dir)"
    if state_dir in here.parents():
        return "the state file", ""
    return "the file", ""


def _file_reason(error: OSError) -> str:
    if error.errno == errno.ENOENT:
        return "no such file or directory"
    if error.errno in (errno.EACCES, errno.EPERM):
        return (
            f"permission denied to this user (uid {os.getuid()}); give it the file or "
            "directory, or choose one it may use"
        )
    if error.errno == errno.EROFS:
        return "it is on a read-only file system"
    if error.errno == errno.ENOTDIR:
        return "part of the path is a file, not a directory"
    if error.errno == errno.EISDIR:
        return "it is a directory, not a file"
    return (error.strerror or str(error)).lower()


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]
