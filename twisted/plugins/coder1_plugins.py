"""twistd plugins: ``twistd coder1-relay`` and ``twistd coder1-bridge``."""

from twisted.application.service import ServiceMaker

coder1_relay = ServiceMaker(
    "coder1-relay", "coder1_relay.tap", "Coder1 pairing and forwarding relay (WSS)", "coder1-relay"
)
coder1_bridge = ServiceMaker(
    "coder1-bridge", "coder1_bridge.tap", "Coder1 bridge: runs IDE commands here", "coder1-bridge"
)
