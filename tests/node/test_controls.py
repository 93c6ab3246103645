"""Operator controls: pause windows, battery, user activity and memory decide pausing."""

from __future__ import annotations

import datetime as dt

import pytest

from darkbloom.config import NodeConfig
from darkbloom.errors import ConfigError
from darkbloom.node.controls import (
    Controls,
    decide,
    parse_ioreg_idle,
    parse_pause_windows,
    parse_pmset,
    sysfs_on_battery,
)


def at(h, m=0):
    return dt.time(h, m)


def test_windows_parse_and_wrap_midnight():
    day, night = parse_pause_windows(("09:00-17:30", "22:00-06:00"))
    assert day.contains(at(9)) and day.contains(at(17, 29)) and not day.contains(at(17, 30))
    assert night.contains(at(23)) and night.contains(at(5, 59)) and not night.contains(at(12))


@pytest.mark.parametrize("spec", ["9-17", "25:00-01:00", "10:00-10:00", "10:00 to 11:00"])
def test_bad_windows_name_the_key(spec):
    with pytest.raises(ConfigError, match="node.pause_windows"):
        parse_pause_windows((spec,))


def base(**kw):
    defaults = dict(windows=(), local_time=at(12), battery=None, idle_s=None, rss_mb=None)
    defaults.update(kw)
    return defaults


def test_decide_each_reason():
    cfg = NodeConfig(pause_on_battery=True, pause_when_user_active=True, user_idle_s=300, max_memory_mb=1000)
    assert not decide(config=cfg, **base()).paused
    assert "pause window" in decide(config=cfg, **base(windows=parse_pause_windows(("11:00-13:00",)))).reason
    assert decide(config=cfg, **base(battery=True)).reason == "running on battery power"
    assert "active 10 s ago" in decide(config=cfg, **base(idle_s=10)).reason
    assert not decide(config=cfg, **base(idle_s=1000)).paused
    assert "above the 1000 MB limit" in decide(config=cfg, **base(rss_mb=1500)).reason


def test_disabled_controls_never_pause():
    cfg = NodeConfig(pause_on_battery=False, pause_when_user_active=False, max_memory_mb=0)
    assert not decide(config=cfg, **base(battery=True, idle_s=0, rss_mb=1e9)).paused


def test_pmset_and_ioreg_parsers():
    assert parse_pmset("Now drawing from 'Battery Power'\n -InternalBattery-0 (id=1)\t80%; discharging") is True
    assert parse_pmset("Now drawing from 'AC Power'\n") is False
    assert parse_pmset("") is None
    assert parse_ioreg_idle('    | |   "HIDIdleTime" = 12500000000\n') == 12.5
    assert parse_ioreg_idle("nothing") is None


def make_supply(root, name, **attrs):
    d = root / name
    d.mkdir()
    for k, v in attrs.items():
        (d / k).write_text(v + "\n")


def test_sysfs_battery(tmp_path):
    assert sysfs_on_battery(tmp_path / "absent") is None
    assert sysfs_on_battery(tmp_path) is None
    make_supply(tmp_path, "BAT0", type="Battery", status="Discharging")
    make_supply(tmp_path, "AC", type="Mains", online="0")
    assert sysfs_on_battery(tmp_path) is True
    (tmp_path / "AC" / "online").write_text("1\n")
    assert sysfs_on_battery(tmp_path) is False


async def test_controls_report_changes():
    controls = Controls(NodeConfig(pause_on_battery=False, max_memory_mb=1))  # any process uses > 1 MB
    changed = controls.changed
    decision = controls.check()
    assert decision.paused and "MB limit" in decision.reason
    assert changed.is_set()


def test_controls_a_system_cannot_honour_are_named_once():
    from darkbloom.node.controls import unsupported_controls

    both = NodeConfig(pause_on_battery=True, pause_when_user_active=True)
    assert unsupported_controls(both, "Darwin") == []
    (linux,) = unsupported_controls(both, "Linux")
    assert linux.startswith("node.pause_when_user_active is off on Linux")
    windows = unsupported_controls(both, "Windows")
    assert [w.split(" is off")[0] for w in windows] == ["node.pause_on_battery", "node.pause_when_user_active"]
    assert unsupported_controls(NodeConfig(pause_on_battery=False), "Windows") == []


async def test_controls_log_each_unsupported_control_at_start(monkeypatch, caplog):
    import logging

    import trio

    from darkbloom.node import controls as module

    monkeypatch.setattr(module.platform, "system", lambda: "FreeBSD")
    caplog.set_level(logging.INFO, logger=module.__name__)
    controls = Controls(NodeConfig(pause_on_battery=True, pause_when_user_active=True))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            decision = await nursery.start(controls.run)
            nursery.cancel_scope.cancel()
    assert not decision.paused  # nothing to read here never pauses
    lines = [r.getMessage() for r in caplog.records if r.name == module.__name__]
    assert sum("pause_on_battery is off on FreeBSD" in line for line in lines) == 1
    assert sum("pause_when_user_active is off on FreeBSD" in line for line in lines) == 1
