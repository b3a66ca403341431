"""The bridge's pairing, kept in the user's config dir with mode 0600."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from urllib.parse import urlsplit

import attrs
from twisted.python.filepath import FilePath

from coder1_wire.e2e import Identity, sas, unb64u
from coder1_wire.secretfile import check_private, read_secret, write_secret

DEFAULT_RELAY = "https://localhost:8443"


class StalePairingError(Exception):
    """A saved pairing this version cannot use; the message says what to do."""


class NotRootError(SystemExit):
    """Raised (as an exit) when started as root."""


def refuse_root(euid: int) -> None:
    """Exit with a clear message when running as root: the bridge runs with the user's rights."""
    if euid == 0:
        raise NotRootError(
            "coder1-bridge refuses to run as root: it runs the IDE's commands with the rights "
            "of the user who starts it. Start it as your normal user."
        )


def config_dir(environ: Mapping[str, str] = os.environ) -> FilePath[str]:
    """C{$XDG_CONFIG_HOME/coder1-bridge}, or C{~/.config/coder1-bridge}."""
    base = environ.get("XDG_CONFIG_HOME", "")
    if not os.path.isabs(base):  # the XDG spec says to ignore a relative value
        base = os.path.join(os.path.expanduser("~"), ".config")
    return FilePath(base).child("coder1-bridge")


@attrs.frozen
class RelayAddress:
    """Where the relay is, and what to trust for its certificate."""

    url: str
    ca_cert_pem: str | None = None

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "localhost"

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or 443

    def websocket_url(self, path: str) -> str:
        return f"wss://{urlsplit(self.url).netloc}{path}"


def parse_relay_url(url: str) -> str:
    """An https URL with no path, or ValueError."""
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError(f"the relay URL must look like https://host[:port], not {url!r}")
    return f"https://{parts.netloc}"


@attrs.frozen
class BridgeConfig:
    """
    A paired bridge: its relay, its token, its number in the browser session,
    its own identity key and the browser identity it pinned (docs/e2e.md).
    """

    relay: RelayAddress
    token: str
    peer: int
    browser_key: str
    identity: Identity = attrs.field(eq=False, repr=False)
    #: The name the IDE shows (C{pair --label}); None: the host name.
    label: str | None = None

    @property
    def verification(self) -> str:
        """The short string the IDE shows for this pairing, to compare by eye."""
        return sas(unb64u(self.browser_key), self.identity.public_raw)

    def save(self, directory: FilePath[str]) -> None:
        write_secret(directory.child("identity.pem"), self.identity.to_pem())
        body = {
            "relay": self.relay.url,
            "ca_cert_pem": self.relay.ca_cert_pem,
            "token": self.token,
            "peer": self.peer,
            "browser_key": self.browser_key,
            "label": self.label,
        }
        write_secret(directory.child("pairing.json"), json.dumps(body, indent=2).encode())

    @classmethod
    def load(cls, directory: FilePath[str]) -> BridgeConfig | None:
        """
        The saved pairing, or None when not paired.

        @raise InsecureFileError: the file is readable by others (the token may
            have leaked: revoke it and pair again).
        @raise StalePairingError: the pairing was made by an older version.
        """
        path, key = directory.child("pairing.json"), directory.child("identity.pem")
        if not path.exists():
            return None
        check_private(path)
        body = json.loads(read_secret(path))
        if "browser_key" not in body or not key.exists():
            raise StalePairingError(
                "this pairing predates end-to-end encryption: run `coder1-bridge pair` again"
            )
        check_private(key)
        return cls(
            RelayAddress(body["relay"], body.get("ca_cert_pem")),
            body["token"],
            body["peer"],
            body["browser_key"],
            Identity.from_pem(read_secret(key)),
            body.get("label"),
        )

    @staticmethod
    def saved_token(directory: FilePath[str]) -> tuple[RelayAddress, str, int] | None:
        """
        The relay, token and bridge number of the saved pairing, even one that
        L{load} refuses (too old, or readable by others): so that it can be
        revoked before it is replaced.  None when there is none.
        """
        path = directory.child("pairing.json")
        try:
            body = json.loads(read_secret(path))
            relay = RelayAddress(str(body["relay"]), body.get("ca_cert_pem"))
            return relay, str(body["token"]), int(body["peer"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @staticmethod
    def forget(directory: FilePath[str]) -> bool:
        """Delete the saved pairing; whether there was one."""
        path = directory.child("pairing.json")
        if not path.exists():
            return False
        path.remove()
        if directory.child("identity.pem").exists():
            directory.child("identity.pem").remove()
        return True
