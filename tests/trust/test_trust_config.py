"""Trust knobs from darkbloom.toml: breaker K/window/cooldowns and spot-check policy overrides reach the shim's trust layer;
bad overrides are a ConfigError naming the key."""

from __future__ import annotations

import pytest

from darkbloom.api.trust.refresh import parse_policy_overrides, routing_from_config
from darkbloom.api.trust.verify import DEFAULT_POLICY
from darkbloom.config import load_config
from darkbloom.errors import ConfigError


def test_toml_knobs_reach_the_trust_layer(tmp_path) -> None:
    path = tmp_path / "darkbloom.toml"
    path.write_text(
        "[api]\nspot_check_probability = 0.05\nbreaker_failures = 5\nbreaker_window_s = 60\n"
        "breaker_cooldown_s = 2\nbreaker_max_cooldown_s = 120\nspot_check_policy = \"min_tokens=8, max_scored_tokens=24\"\n"
        "hedge = true\n[relay]\nprobe_interval_s = 60\ncanary_interval_s = 0\n"
    )
    config = load_config(path, env={})
    routing = routing_from_config(config.api)
    b = routing.book.breaker_policy
    assert (b.failures, b.window_s, b.base_cooldown_s, b.max_cooldown_s) == (5, 60.0, 2.0, 120.0)
    assert routing.spot_check_probability == 0.05 and routing.hedge.enabled
    assert routing.verify_policy.min_tokens == 8 and routing.verify_policy.max_scored_tokens == 24
    assert routing.policy_for(0.0).min_tokens == 8 and routing.policy_for(1.0).min_tokens == 8
    assert config.relay.probe_interval_s == 60.0 and config.relay.canary_interval_s == 0.0


def test_bad_policy_overrides_name_the_key() -> None:
    with pytest.raises(ConfigError, match="no_such_rule"):
        parse_policy_overrides("no_such_rule=3", DEFAULT_POLICY)
    with pytest.raises(ConfigError, match="min_tokens needs a number"):
        parse_policy_overrides("min_tokens=many", DEFAULT_POLICY)
    assert parse_policy_overrides("", DEFAULT_POLICY) == DEFAULT_POLICY
