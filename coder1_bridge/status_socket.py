"""
The running bridge's status, for C{coder1-bridge status}: a UNIX socket,
owner-only, that answers each connection with one JSON line (pid, whether it
is connected to the relay and since when, how many terminals and commands it
runs: counts, never content) and closes.  A socket that answers is a bridge
that runs; its lock file (C{.lock}) keeps a second bridge of the same
pairing from taking it over.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, TimeoutError, maybeDeferred
from twisted.internet.endpoints import UNIXClientEndpoint, UNIXServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath

from coder1_bridge.output import Problem

#: Longest socket path (sun_path: 108 bytes on Linux, 104 on macOS, with room for ".lock").
MAX_SOCKET_PATH = 100
#: Seconds C{coder1-bridge status} waits for the running bridge's answer.
QUERY_TIMEOUT = 3.0
#: The most an answer may hold.
MAX_ANSWER = 64 * 1024

Snapshot = Callable[[], dict[str, Any]]


def socket_path(config_dir: FilePath[str]) -> FilePath[str]:
    """
    C{bridge.sock} in the pairing's directory; for a directory whose path is
    too long for a socket, a name made from it in a private directory of the
    user's under the temporary directory.
    """
    path = config_dir.child("bridge.sock")
    if len(path.path.encode()) <= MAX_SOCKET_PATH:
        return path
    digest = hashlib.sha256(config_dir.path.encode()).hexdigest()[:16]
    return _private_temp().child(f"{digest}.sock")


def _private_temp() -> FilePath[str]:
    directory = FilePath(tempfile.gettempdir()).child(f"coder1-bridge-{os.getuid()}")
    with contextlib.suppress(FileExistsError):
        os.mkdir(directory.path, 0o700)
    info = os.lstat(directory.path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise Problem(
            f"{directory.path} is not a private directory of yours: remove it, then try again."
        )
    return directory


class _Answer(Protocol):
    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def connectionMade(self) -> None:
        self.transport.write(json.dumps(self.snapshot()).encode() + b"\n")  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]


class StatusService(Service):
    """Answers C{coder1-bridge status} while the bridge runs."""

    log = Logger()

    def __init__(self, reactor: Any, config_dir: FilePath[str], snapshot: Snapshot) -> None:
        self.reactor = reactor
        self.config_dir = config_dir
        self.snapshot = snapshot
        self.port: IListeningPort | None = None
        self.listening: Deferred[None] = Deferred()

    def startService(self) -> None:
        super().startService()
        self.listening = Deferred.fromCoroutine(self._listen())

    async def _listen(self) -> None:
        try:
            path = socket_path(self.config_dir)
            endpoint = UNIXServerEndpoint(self.reactor, path.path, mode=0o600, wantPID=True)
            self.port = await endpoint.listen(Factory.forProtocol(lambda: _Answer(self.snapshot)))
        except (CannotListenError, OSError, Problem) as e:
            self.log.warn(
                "no status socket: {error}",
                error=str(e),
                person="`coder1-bridge status` cannot see this bridge: {error}",
            )

    async def _stop(self) -> None:
        await self.listening
        if self.port is not None:
            await maybeDeferred(self.port.stopListening)
            self.port = None
        super().stopService()

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())


class _Read(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if len(self.data) > MAX_ANSWER:
            self.transport.abortConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.done.callback(self.data)


async def query(reactor: Any, config_dir: FilePath[str]) -> dict[str, Any] | None:
    """What the bridge running for this pairing says of itself; None if none runs."""
    path = socket_path(config_dir)
    if not path.exists():
        return None
    reader = _Read()
    endpoint = UNIXClientEndpoint(reactor, path.path, timeout=int(QUERY_TIMEOUT))
    try:
        await endpoint.connect(Factory.forProtocol(lambda: reader))
    except Exception:
        return None  # a socket left by a bridge that was killed
    try:
        raw = await reader.done.addTimeout(QUERY_TIMEOUT, reactor)
    except TimeoutError:
        reader.transport.abortConnection()  # type: ignore[union-attr]
        return None
    try:
        answer = json.loads(raw)
    except ValueError:
        return None
    return answer if isinstance(answer, dict) else None
