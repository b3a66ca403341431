"""The Coder1 relay: pairing, session tokens, and blind forwarding."""
