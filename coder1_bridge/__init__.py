"""The Coder1 bridge: runs the IDE's commands on this machine."""
