"""Config: defaults < file < env < flags, and errors that name the key and the source."""

from __future__ import annotations

import pytest

from darkbloom.config import Config, ModelSpec, load_config
from darkbloom.errors import ConfigError


def write(tmp_path, text: str):
    path = tmp_path / "darkbloom.toml"
    path.write_text(text)
    return path


def test_defaults_without_a_file():
    cfg = load_config(env={})
    assert cfg == Config()
    assert cfg.api.port == 8080 and cfg.api.host == "127.0.0.1"
    assert cfg.ledger.operator_share == 0.95


def test_precedence_defaults_file_env_flags(tmp_path):
    path = write(tmp_path, "[api]\nport = 9000\nhost = '0.0.0.0'\n[ledger]\nepoch_s = 60\n")
    assert load_config(path, env={}).api.port == 9000
    env = {"DARKBLOOM_API_PORT": "9100"}
    cfg = load_config(path, env=env)
    assert cfg.api.port == 9100
    assert cfg.api.host == "0.0.0.0"  # file value survives where env is silent
    assert cfg.ledger.epoch_s == 60
    cfg = load_config(path, env=env, overrides={"api.port": 9200, "data_dir": str(tmp_path)})
    assert cfg.api.port == 9200
    assert cfg.data_path == tmp_path


def test_config_path_from_env(tmp_path):
    path = write(tmp_path, "log_level = 'DEBUG'\n")
    assert load_config(env={"DARKBLOOM_CONFIG": str(path)}).log_level == "DEBUG"


def test_env_types_are_parsed(tmp_path):
    cfg = load_config(
        env={
            "DARKBLOOM_API_HOSTED": "yes",
            "DARKBLOOM_LEDGER_OPERATOR_SHARE": "0.9",
            "DARKBLOOM_P2P_BOOTSTRAP": "/ip4/127.0.0.1/tcp/1/p2p/a, /ip4/127.0.0.1/tcp/2/p2p/b",
            "DARKBLOOM_DATA_DIR": str(tmp_path),
        }
    )
    assert cfg.api.hosted is True
    assert cfg.ledger.operator_share == 0.9
    assert cfg.p2p.bootstrap == ("/ip4/127.0.0.1/tcp/1/p2p/a", "/ip4/127.0.0.1/tcp/2/p2p/b")
    assert cfg.data_path == tmp_path


def test_model_tables(tmp_path):
    path = write(
        tmp_path,
        "[inference]\nmodels = [{id = 'a', path = '/m/a'}, {id = 'e', kind = 'embedding'}]\n",
    )
    cfg = load_config(path, env={})
    assert cfg.inference.models == (ModelSpec(id="a", path="/m/a"), ModelSpec(id="e", kind="embedding"))


@pytest.mark.parametrize(
    "text,needle",
    [
        ("[api]\nprot = 1\n", "api.prot: unknown key"),
        ("[apy]\nport = 1\n", "apy: unknown section or key"),
        ("[api]\nport = 'eighty'\n", "api.port: must be an integer, got str"),
        ("[api]\nport = true\n", "api.port: must be an integer, got bool"),
        ("[p2p]\nreachability = 'sometimes'\n", "p2p.reachability: must be one of"),
        ("[p2p]\nbootstrap = '/ip4/1.2.3.4'\n", "p2p.bootstrap: must be a list"),
        ("api = 3\n", "api: must be a table"),
        ("[inference]\nmodels = [{path = 'x'}]\n", "inference.models[0]: missing id"),
        ("[inference]\nmodels = [{id = 'x', colour = 'red'}]\n", "inference.models[0].colour: unknown key"),
        ("[api\nport = 1\n", "not valid TOML"),
    ],
)
def test_file_errors_name_key_and_file(tmp_path, text, needle):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert needle in str(info.value)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "env,needle",
    [
        ({"DARKBLOOM_API_PROT": "1"}, "DARKBLOOM_API_PROT: unknown key"),
        ({"DARKBLOOM_NOPE": "1"}, "DARKBLOOM_NOPE: unknown environment variable"),
        ({"DARKBLOOM_API_PORT": "x"}, "DARKBLOOM_API_PORT: expected an integer"),
        ({"DARKBLOOM_API_HOSTED": "maybe"}, "DARKBLOOM_API_HOSTED: expected true or false"),
    ],
)
def test_env_errors_name_the_variable(env, needle):
    with pytest.raises(ConfigError) as info:
        load_config(env=env)
    assert needle in str(info.value)
    assert "environment" in str(info.value)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "absent.toml", env={})


def test_flag_errors_name_the_command_line():
    with pytest.raises(ConfigError, match="command line: api.port: must be an integer"):
        load_config(env={}, overrides={"api.port": "x"})


def test_config_is_frozen():
    cfg = load_config(env={})
    with pytest.raises(AttributeError):
        cfg.api.port = 1  # type: ignore[misc]
