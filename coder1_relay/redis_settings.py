"""
Where a shared store is and how to reach it: the C{--store} URL and its options.

Plain data, no I/O but reading the password file, and no Redis client: the
options can be checked (and the relay refuse to start) before anything
connects, and without the optional client library installed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from urllib.parse import unquote, urlsplit

import attrs
from cryptography import x509
from twisted.python.filepath import FilePath

#: The environment variable that may hold the store's password.
PASSWORD_ENV = "CODER1_REDIS_PASSWORD"  # noqa: S105  # a name, not a password
DEFAULT_PORT = 6379
DEFAULT_PREFIX = "coder1:"
#: Seconds a store call may take before it fails with C{StoreUnavailable}.
DEFAULT_TIMEOUT = 2.0
#: What to do when Redis refused the relay (its password, user or database).
REFUSAL_HINT = (
    "check --store-password-file (or CODER1_REDIS_PASSWORD) and the URL's user and database, "
    "then restart the relay"
)
_URL_FORM = "redis://HOST:PORT/DB or rediss://HOST:PORT/DB"


@attrs.frozen
class RedisSettings:
    """How to reach the Redis that holds the relay's shared state."""

    host: str
    port: int = DEFAULT_PORT
    db: int = 0
    #: rediss://: TLS, the server's certificate checked against C{ca_file} (else the
    #: system's roots).
    tls: bool = False
    #: An ACL user (C{redis://USER@HOST}); the default user when None.
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    ca_file: FilePath[str] | None = None
    #: Every key and channel name starts with it, so deployments can share one Redis.
    prefix: str = DEFAULT_PREFIX
    timeout: float = DEFAULT_TIMEOUT

    @classmethod
    def from_url(cls, url: str) -> RedisSettings:
        """
        The settings of a C{redis://} or C{rediss://} URL (the other fields
        at their defaults).

        @raise ValueError: the URL is malformed or holds a password; the
            message is one sentence saying what to write instead.
        """
        # The URL itself is never repeated in a message: a mistyped one could hold a password.
        try:
            parts = urlsplit(url)
        except ValueError:  # an unclosed [IPv6 address
            raise ValueError(f"the URL must be {_URL_FORM}") from None
        if parts.password is not None:
            raise ValueError(
                "do not put the password in the URL (the process list shows it): "
                f"use --store-password-file or the {PASSWORD_ENV} environment variable"
            )
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(f"the URL must be {_URL_FORM}")
        try:
            port = parts.port
        except ValueError:
            port = 0
        if port == 0:
            raise ValueError(f"the port must be a number from 1 to 65535: {_URL_FORM}")
        if not parts.hostname:
            raise ValueError(f"the URL needs a host: {_URL_FORM}")
        if parts.query or parts.fragment:
            raise ValueError(f"the URL takes no ?query or #fragment: {_URL_FORM}")
        db = parts.path.lstrip("/") or "0"
        if "/" in parts.path[1:] or not db.isdigit() or not db.isascii():
            raise ValueError(f"the database must be a number: {_URL_FORM}")
        return cls(
            host=parts.hostname,
            port=DEFAULT_PORT if port is None else port,
            db=int(db),
            tls=parts.scheme == "rediss",
            username=unquote(parts.username) if parts.username else None,
        )

    @property
    def address(self) -> str:
        """The store's URL, for logs (no password ever is in it)."""
        scheme = "rediss" if self.tls else "redis"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/{self.db}"


def read_password(path: FilePath[str] | None, environ: Mapping[str, str]) -> str | None:
    """
    The store's password: the first line of C{path} when given, else
    C{CODER1_REDIS_PASSWORD}, else None.

    @raise ValueError: the file cannot be read, or is empty.
    """
    if path is None:
        return environ.get(PASSWORD_ENV) or None
    try:
        text = path.getContent().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "it is not UTF-8 text"
        raise ValueError(f"cannot read {path.path}: {reason}") from None
    password = text.splitlines()[0] if text.strip() else ""
    if not password:
        raise ValueError(f"{path.path} is empty; put the password on its first line")
    return password


def settings_from_options(
    url: str,
    *,
    ca_file: str | None,
    password_file: str | None,
    prefix: str,
    environ: Mapping[str, str] = os.environ,
) -> RedisSettings:
    """
    The settings the C{--store*} options describe.

    @raise ValueError: one sentence naming the option that is wrong.
    """
    try:
        settings = RedisSettings.from_url(url)
    except ValueError as e:
        raise ValueError(f"--store: {e}") from None
    if ca_file is not None:
        if not settings.tls:
            raise ValueError("--store-ca needs a rediss:// (TLS) --store URL")
        try:
            x509.load_pem_x509_certificates(FilePath(ca_file).getContent())
        except OSError as e:
            raise ValueError(f"--store-ca: cannot read {ca_file}: {e.strerror}") from None
        except ValueError:
            raise ValueError(f"--store-ca: no PEM certificate in {ca_file}") from None
    if not prefix or any(c.isspace() for c in prefix):
        raise ValueError("--store-prefix must be a non-empty word (default coder1:)")
    try:
        password = read_password(FilePath(password_file) if password_file else None, environ)
    except ValueError as e:
        raise ValueError(f"--store-password-file: {e}") from None
    return attrs.evolve(
        settings,
        prefix=prefix,
        password=password,
        ca_file=FilePath(ca_file) if ca_file else None,
    )
