"""C{twistd coder1-relay}: options in, a RelayService out."""

from __future__ import annotations

import gc
import importlib.util
from typing import Any

import attrs
from twisted.application.service import IService
from twisted.python import usage
from twisted.python.filepath import FilePath

from coder1_relay.certs import default_state_dir
from coder1_relay.context import Limits
from coder1_relay.drain import DRAIN_TIMEOUT
from coder1_relay.redis_settings import (
    DEFAULT_PREFIX,
    PASSWORD_ENV,
    RedisSettings,
    settings_from_options,
)
from coder1_relay.reload import ReloadOnHangup
from coder1_relay.routing import HubSettings
from coder1_relay.service import RelayService, RelaySettings
from coder1_relay.startup_errors import check_endpoint, file_failure
from coder1_relay.telemetry import TelemetrySettings
from coder1_wire.log_format import check_log_format, logging_as_chosen
from coder1_wire.twistd_errors import (
    OneLineUsageErrors,
    exit_with_status_when_done,
    runs_in_foreground,
    say_cannot_start,
)

_DEFAULT = Limits()
#: The garbage collector's thresholds in the relay's process.  A full collection
#: walks every object of every session held (about 200 ms at 3,000 sessions, the
#: relay serving nobody meanwhile); with Python's (700, 10, 10) one came about every
#: 1,000 pairings.  A closed session is freed by reference counting alone
#: (tests/test_freed.py), so the relay makes full collections 10 times rarer.
GC_THRESHOLDS = (700, 10, 100)
#: The limits as options: (option, C{Limits} field, type, help).  README.md ("Limits") says why.
LIMIT_OPTIONS: list[tuple[str, str, type, str]] = [
    ("max-message-size", "max_message_size", int, "Largest WebSocket message, bytes (1009)."),
    ("max-body-size", "max_body_size", int, "Largest HTTP request body, bytes (413)."),
    (
        "handshake-timeout",
        "handshake_timeout",
        float,
        "Seconds an HTTP request or WebSocket handshake may take to arrive.",
    ),
    (
        "tls-handshake-timeout",
        "tls_handshake_timeout",
        float,
        "Seconds from TCP connect to a finished TLS handshake.",
    ),
    (
        "idle-timeout",
        "idle_timeout",
        float,
        "Seconds of silence before an HTTP or WebSocket connection is closed (at least 30).",
    ),
    (
        "messages-per-second",
        "messages_per_second",
        float,
        "Messages a second an IDE connection may send (4029 past it).",
    ),
    ("message-burst", "message_burst", int, "Burst of messages an IDE connection may send."),
    (
        "bridge-messages-per-second",
        "bridge_messages_per_second",
        float,
        "Messages a second the relay reads from a bridge (it slows the bridge down past it).",
    ),
    (
        "bridge-message-burst",
        "bridge_message_burst",
        int,
        "Burst of messages the relay reads from a bridge.",
    ),
    (
        "connections-per-ip",
        "connections_per_ip",
        int,
        "TCP connections open at once from one IP address (0: no limit).",
    ),
    (
        "new-connections-per-second",
        "new_connections_per_second",
        float,
        "New TCP connections a second from one IP address (0: no limit).",
    ),
    (
        "new-connection-burst",
        "new_connection_burst",
        int,
        "Burst of new TCP connections from one IP address.",
    ),
    (
        "ide-connections-per-session",
        "ide_connections_per_session",
        int,
        "IDE WebSockets open at once per browser session (429 past it).",
    ),
    (
        "bridges-per-session",
        "bridges_per_session",
        int,
        "Paired bridges per browser session (409 past it).",
    ),
    (
        "max-connections",
        "max_connections",
        int,
        "TCP connections open at once over the whole relay "
        "(0: as many as the open-file limit leaves).",
    ),
]
#: The shortest idle timeout: two of the heartbeat intervals parties are told to keep.
MIN_IDLE_TIMEOUT = 2 * HubSettings().heartbeat_interval


class Options(OneLineUsageErrors):
    """Options for the relay; every listening address is an endpoint string."""

    command = "twistd coder1-relay"
    synopsis = "[options]"
    longdesc = (
        "Runs the Coder1 relay: serves the IDE page, issues pairing codes, and forwards "
        "frames between browsers and their paired bridges over TLS 1.3 WebSockets. With no "
        "options it listens on 127.0.0.1:8443 with a self-signed development certificate."
    )
    optFlags = [
        [
            "no-access-log",
            None,
            "Log no line per HTTP request (the access log has address, method, path, "
            "status, size, referrer and user agent; never a body, cookie or token).",
        ],
    ]
    optParameters = [
        [
            "listen",
            "l",
            "tcp:8443:interface=127.0.0.1",
            "Socket endpoint to listen on (TLS is added).",
        ],
        [
            "state-dir",
            "s",
            None,
            "Keys, dev certificate, pairings, telemetry (default: XDG state dir).",
        ],
        [
            "tls-cert",
            None,
            None,
            "PEM certificate chain (leaf first) instead of the dev certificate.",
        ],
        ["tls-key", None, None, "PEM private key for --tls-cert."],
        [
            "public-url",
            None,
            None,
            "The URL users reach this relay at (default https://localhost:PORT).",
        ],
        [
            "log-format",
            None,
            "text",
            "twistd's log as text, or json: one JSON object a line (time, level, namespace, "
            "system, text).",
        ],
        ["token-days", None, 30.0, "Lifetime of bridge tokens, in days.", float],
        [
            "telemetry-max-size",
            None,
            32.0,
            "MiB the telemetry database may fill; past it new rows are dropped and counted.",
            float,
        ],
        [
            "store",
            None,
            None,
            "Keep the state the relay processes of a deployment share in Redis: "
            "redis://HOST:PORT/DB, or rediss://HOST:PORT/DB for TLS (default: in this "
            "process's memory, with pairings.json in --state-dir). See docs/scaling.md.",
        ],
        [
            "store-ca",
            None,
            None,
            "PEM file of the CA certificates a rediss:// store's certificate must chain to "
            "(default: the system's).",
        ],
        [
            "store-password-file",
            None,
            None,
            f"File whose first line is the store's password (else ${PASSWORD_ENV}; "
            "never in the URL).",
        ],
        ["store-prefix", None, DEFAULT_PREFIX, "Prefix of the relay's keys in the store."],
        [
            "node-listen",
            None,
            "tcp:8444:interface=127.0.0.1",
            "With a shared --store: endpoint other relay nodes' links arrive at (TLS is added).",
        ],
        [
            "node-address",
            None,
            None,
            "With a shared --store: HOST:PORT other nodes reach --node-listen at "
            "(default: its interface and port).",
        ],
        [
            "node-ca",
            None,
            None,
            "PEM CA certificates other nodes' certificates are checked with (default: this "
            "node's own certificate if self-signed, else the system's CAs).",
        ],
        [
            "metrics-listen",
            None,
            None,
            "Endpoint to serve /healthz, /readyz and /metrics on, in plain HTTP: a private "
            "interface, e.g. tcp:9464:interface=127.0.0.1 (default: not served).",
        ],
        [
            "drain-timeout",
            None,
            DRAIN_TIMEOUT,
            "Seconds a stopping relay waits for its WebSockets (closed with 1001, going "
            "away) to close and its store to flush before it exits.",
            float,
        ],
        [
            "send-buffer-size",
            None,
            HubSettings().send_buffer,
            "Bytes queued for a connection that reads too slowly before the relay stops "
            "reading what would go to it (flow control).",
            int,
        ],
        *(
            [option, None, getattr(_DEFAULT, field), doc, kind]
            for option, field, kind, doc in LIMIT_OPTIONS
        ),
    ]

    def __init__(self) -> None:
        super().__init__()
        self["allowed-origin"] = []
        self["hostname"] = []
        #: The checked C{--store} options (by L{postOptions}).
        self.store: RedisSettings | None = None

    def opt_allowed_origin(self, origin: str) -> None:
        """Another origin allowed to open IDE WebSockets (repeatable)."""
        self["allowed-origin"].append(origin.rstrip("/"))

    def opt_hostname(self, name: str) -> None:
        """A name or address the dev certificate covers (repeatable; default: loopback)."""
        self["hostname"].append(name)

    def postOptions(self) -> None:
        if bool(self["tls-cert"]) != bool(self["tls-key"]):
            raise usage.UsageError("--tls-cert and --tls-key go together")
        if self["token-days"] <= 0:
            raise usage.UsageError("--token-days must be positive")
        url = self["public-url"]
        if url is not None and not url.startswith("https://"):
            example = "https://" + url.partition("://")[2 if "://" in url else 0]
            raise usage.UsageError(f"--public-url must be an https:// URL, such as {example}")
        if self["idle-timeout"] < MIN_IDLE_TIMEOUT:
            raise usage.UsageError(f"--idle-timeout must be at least {MIN_IDLE_TIMEOUT:g}")
        address = self["node-address"]
        if address is not None and not _host_port(address):
            raise usage.UsageError("--node-address must be HOST:PORT")
        if self["telemetry-max-size"] < 1:
            raise usage.UsageError("--telemetry-max-size must be at least 1 (MiB)")
        if self["drain-timeout"] < 0:
            raise usage.UsageError("--drain-timeout must be 0 or more")
        if self["send-buffer-size"] <= 0:
            raise usage.UsageError("--send-buffer-size must be positive")
        check_log_format(self)
        self.store = self._store()
        try:
            self.limits()
        except ValueError as e:  # "<field> must be positive, not 0"
            field, _, rest = str(e).partition(" ")
            raise usage.UsageError(f"--{field.replace('_', '-')} {rest}") from None

    def _store(self) -> RedisSettings | None:
        """The shared store the options ask for, checked; None for the in-memory one."""
        if self["store"] is None:
            for option in ("store-ca", "store-password-file"):
                if self[option] is not None:
                    raise usage.UsageError(f"--{option} goes with --store")
            return None
        try:
            settings = settings_from_options(
                self["store"],
                ca_file=self["store-ca"],
                password_file=self["store-password-file"],
                prefix=self["store-prefix"],
            )
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        if importlib.util.find_spec("txredisapi") is None:
            raise usage.UsageError(
                "--store needs the Redis client: pip install 'coder1-bridge[redis]'"
            )
        return settings

    def limits(self) -> Limits:
        """The limits these options describe."""
        return Limits(**{field: self[option] for option, field, _, _ in LIMIT_OPTIONS})

    def settings(self) -> RelaySettings:
        """The settings these options describe."""
        return RelaySettings(
            tls_cert=FilePath(self["tls-cert"]) if self["tls-cert"] else None,
            tls_key=FilePath(self["tls-key"]) if self["tls-key"] else None,
            hostnames=tuple(self["hostname"]) or RelaySettings.DEFAULT_HOSTNAMES,
            listen=self["listen"],
            state_dir=FilePath(self["state-dir"]) if self["state-dir"] else default_state_dir(),
            public_url=self["public-url"].rstrip("/") if self["public-url"] else None,
            allowed_origins=tuple(self["allowed-origin"]),
            token_lifetime=self["token-days"] * 86400.0,
            limits=self.limits(),
            access_log=not self["no-access-log"],
            telemetry=TelemetrySettings(max_bytes=int(self["telemetry-max-size"] * 1024 * 1024)),
            store=self.store,
            node_listen=self["node-listen"],
            node_address=self["node-address"],
            node_ca=FilePath(self["node-ca"]) if self["node-ca"] else None,
            metrics_listen=self["metrics-listen"],
            drain_timeout=self["drain-timeout"],
            # WebSockets go idle by the heartbeat: one idle timeout for both.
            hub=attrs.evolve(
                HubSettings(),
                heartbeat_timeout=self["idle-timeout"],
                send_buffer=self["send-buffer-size"],
            ),
        )


def _host_port(address: str) -> bool:
    host, _, port = address.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


def makeService(options: Options) -> IService:
    """
    The relay service for C{twistd coder1-relay}, logging as C{--log-format}
    says.  What would stop it from starting (a listening endpoint, a file) is
    checked here, before twistd detaches a daemon, and said in one line.
    """
    from twisted.internet import reactor

    reactor_: Any = reactor
    say_cannot_start(runs_in_foreground(options))
    settings = options.settings()
    check_endpoint(reactor_, settings.listen, "--listen")
    if settings.store is not None:
        check_endpoint(reactor_, settings.node_listen, "--node-listen")
    if settings.metrics_listen is not None:
        check_endpoint(reactor_, settings.metrics_listen, "--metrics-listen")
    try:
        relay = RelayService(reactor_, settings)
    except Exception as e:
        said = file_failure(
            e, state_dir=settings.state_dir, tls_cert=settings.tls_cert, tls_key=settings.tls_key
        )
        if said is None:
            raise
        raise said from None
    ReloadOnHangup(reactor_, relay.reload_certificate).setServiceParent(relay)
    relay.cannot_run = lambda: exit_with_status_when_done(1)
    gc.set_threshold(*GC_THRESHOLDS)
    return logging_as_chosen(options, relay)
