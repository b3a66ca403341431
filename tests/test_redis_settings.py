"""Tests for L{coder1_relay.redis_settings}: the C{--store} URL, its options and the password."""

from __future__ import annotations

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from coder1_relay.certs import load_or_create
from coder1_relay.redis_settings import RedisSettings, read_password, settings_from_options


class URLTests(SynchronousTestCase):
    """redis:// and rediss:// URLs: host, port, database, user, and nothing secret."""

    def test_forms(self) -> None:
        """Host, port and database are read; the port defaults to 6379 and the database to 0."""
        cases = {
            "redis://cache.internal": ("cache.internal", 6379, 0, False, None),
            "redis://10.0.0.5:6380/3": ("10.0.0.5", 6380, 3, False, None),
            "rediss://r.example:6390/": ("r.example", 6390, 0, True, None),
            "redis://[::1]:7000/1": ("::1", 7000, 1, False, None),
            "rediss://relay%40eu@r.example/2": ("r.example", 6379, 2, True, "relay@eu"),
        }
        for url, expected in cases.items():
            s = RedisSettings.from_url(url)
            self.assertEqual((s.host, s.port, s.db, s.tls, s.username), expected, url)
        self.assertEqual(
            RedisSettings.from_url("redis://[::1]:7000/1").address, "redis://[::1]:7000/1"
        )

    def test_password_in_url_refused(self) -> None:
        """A password in the URL is refused, saying where it goes instead, and not repeated."""
        for url in ("redis://:hunter2@r:6379/0", "rediss://user:hunter2@r/0"):
            with self.assertRaises(ValueError) as raised:
                RedisSettings.from_url(url)
            message = str(raised.exception)
            self.assertIn("--store-password-file", message)
            self.assertIn("CODER1_REDIS_PASSWORD", message)
            self.assertNotIn("hunter2", message)

    def test_malformed(self) -> None:
        """Each malformed URL gets one sentence that shows the right form."""
        for url in (
            "",
            "localhost:6379",
            "http://r:6379/0",
            "redis://",
            "redis://r:port/0",
            "redis://r:0/0",
            "redis://r:99999/0",
            "redis://r:6379/db",
            "redis://r:6379/0/1",
            "redis://r:6379/٣",
            "redis://r:6379/0?ssl=true",
            "redis://[::1:6379/0",
        ):
            with self.assertRaises(ValueError) as raised:
                RedisSettings.from_url(url)
            message = str(raised.exception)
            self.assertIn("redis://HOST:PORT/DB", message, url)
            self.assertNotIn("\n", message)

    def test_password_never_in_repr(self) -> None:
        """Settings printed or logged never show the password."""
        settings = settings_from_options(
            "redis://r/0",
            ca_file=None,
            password_file=None,
            prefix="coder1:",
            environ={"CODER1_REDIS_PASSWORD": "hunter2"},
        )
        self.assertEqual(settings.password, "hunter2")
        self.assertNotIn("hunter2", repr(settings))


class OptionTests(SynchronousTestCase):
    """The C{--store*} options together, and the password's sources."""

    def setUp(self) -> None:
        self.directory = FilePath(self.mktemp())
        self.directory.makedirs()

    def options(self, url: str = "redis://r/0", **given: str | None) -> RedisSettings:
        values: dict[str, str | None] = {"ca_file": None, "password_file": None, **given}
        return settings_from_options(
            url,
            ca_file=values["ca_file"],
            password_file=values["password_file"],
            prefix=given.get("prefix") or "coder1:",
            environ={"CODER1_REDIS_PASSWORD": "from-env"},
        )

    def test_password_file_wins(self) -> None:
        """The file's first line is the password, before the environment's."""
        secret = self.directory.child("redis-password")
        secret.setContent(b"from file\nignored\n")
        self.assertEqual(self.options(password_file=secret.path).password, "from file")
        self.assertEqual(self.options().password, "from-env")

    def test_password_file_problems(self) -> None:
        """A missing or empty password file is an error naming the option and the file."""
        empty = self.directory.child("empty")
        empty.setContent(b"\n")
        for path, reason in (
            (self.directory.child("none").path, "No such file"),
            (empty.path, "empty"),
        ):
            with self.assertRaises(ValueError) as raised:
                self.options(password_file=path)
            self.assertIn("--store-password-file", str(raised.exception))
            self.assertIn(reason, str(raised.exception))

    def test_no_environment_no_password(self) -> None:
        """Without the file or the variable there is no password."""
        self.assertIsNone(read_password(None, {}))

    def test_ca_needs_tls_and_certificates(self) -> None:
        """--store-ca goes with rediss:// only, and must name a file of PEM certificates."""
        keys, _ = load_or_create(self.directory, tls_cert=None, tls_key=None, hostnames=["r"])
        ca = self.directory.child("ca.pem")
        ca.setContent(keys.tls_cert_pem)
        self.assertEqual(self.options("rediss://r/0", ca_file=ca.path).ca_file, ca)
        with self.assertRaises(ValueError) as raised:
            self.options("redis://r/0", ca_file=ca.path)
        self.assertIn("rediss://", str(raised.exception))
        junk = self.directory.child("junk.pem")
        junk.setContent(b"not a certificate")
        for path, reason in (
            (self.directory.child("missing").path, "No such file"),
            (junk.path, "no PEM certificate"),
        ):
            with self.assertRaises(ValueError) as raised:
                self.options("rediss://r/0", ca_file=path)
            self.assertIn(reason, str(raised.exception))

    def test_bad_url_names_the_option(self) -> None:
        """A URL error says it is about --store."""
        with self.assertRaises(ValueError) as raised:
            self.options("redis//r")
        self.assertTrue(str(raised.exception).startswith("--store: "))

    def test_prefix(self) -> None:
        """The prefix is kept; one with spaces in it is refused."""
        self.assertEqual(self.options(prefix="staging:").prefix, "staging:")
        with self.assertRaises(ValueError):
            self.options(prefix="two words")
