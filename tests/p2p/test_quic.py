"""`[p2p] quic = true` is refused with a clear error (QUIC in py-libp2p 0.8.1: docs/P2P-QUIC.md)."""

import pytest

from darkbloom.errors import ConfigError
from darkbloom.identity import Identity
from darkbloom.p2p.network import LibP2PNetwork
from darkbloom.p2p.testing import loopback_config


def test_quic_flag_is_refused_with_the_reason_and_what_to_do():
    with pytest.raises(ConfigError) as info:
        LibP2PNetwork(loopback_config(quic=True), Identity.generate(), role="node")
    err = info.value
    assert err.key == "p2p.quic"
    assert "docs/P2P-QUIC.md" in str(err)
    assert "quic = false" in err.hint

