"""The wire format spoken by the relay, the bridge and the browser."""

__version__ = "0.1.0"
