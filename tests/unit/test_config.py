"""Config: precedence defaults < TOML < SHOAL_* env < flags, validation, README in sync."""

from __future__ import annotations

import argparse
import dataclasses
import socket
from pathlib import Path

import pytest

from node.config import (
    README_BEGIN,
    README_END,
    Config,
    ConfigError,
    env_var,
    flag,
    load_config,
    options_markdown,
    parse_value,
)

REPO = Path(__file__).resolve().parents[2]


def write_toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "shoal.toml"
    path.write_text(text)
    return str(path)


def test_defaults_are_the_dev_defaults_and_node_id_is_derived_from_host_and_port():
    config = load_config({}, env={})
    assert (config.host, config.mqtt_port) == ("127.0.0.1", 1883)
    assert (config.admin_host, config.admin_port) == ("127.0.0.1", 8080)
    assert config.data_dir == "./data"
    assert config.node_id == f"{socket.gethostname()}-1883"


def test_derived_node_id_uses_the_configured_port():
    assert load_config({"mqtt_port": 1999}, env={}).node_id.endswith("-1999")


def test_toml_overrides_defaults(tmp_path):
    path = write_toml(tmp_path, 'mqtt_port = 2000\nnode_id = "n1"\nretain_available = false\n'
                                "shutdown_grace = 1\n")
    config = load_config({"config": path}, env={})
    assert config.mqtt_port == 2000
    assert config.node_id == "n1"
    assert config.retain_available is False
    assert config.shutdown_grace == 1.0 and isinstance(config.shutdown_grace, float)


def test_env_overrides_toml(tmp_path):
    path = write_toml(tmp_path, "mqtt_port = 2000\nmax_queue = 5\n")
    config = load_config({"config": path}, env={"SHOAL_MQTT_PORT": "3000"})
    assert config.mqtt_port == 3000
    assert config.max_queue == 5


def test_flags_override_env_and_toml(tmp_path):
    path = write_toml(tmp_path, "mqtt_port = 2000\n")
    config = load_config({"config": path, "mqtt_port": "4000"}, env={"SHOAL_MQTT_PORT": "3000"})
    assert config.mqtt_port == 4000


def test_flag_given_as_none_means_not_given():
    config = load_config({"mqtt_port": None, "queue_qos0_offline": None},
                         env={"SHOAL_MQTT_PORT": "3000", "SHOAL_QUEUE_QOS0_OFFLINE": "yes"})
    assert config.mqtt_port == 3000
    assert config.queue_qos0_offline is True


def test_config_file_can_come_from_the_environment(tmp_path):
    path = write_toml(tmp_path, "max_inflight = 7\n")
    assert load_config({}, env={"SHOAL_CONFIG": path}).max_inflight == 7


def test_argparse_namespace_is_accepted_and_its_other_attributes_ignored():
    ns = argparse.Namespace(command="run", handler=print, config=None, mqtt_port="1885",
                            queue_qos0_offline=True)
    config = load_config(ns, env={})
    assert config.mqtt_port == 1885 and config.queue_qos0_offline is True


@pytest.mark.parametrize("text,expected", [
    ("1", True), ("true", True), ("YES", True), ("on", True),
    ("0", False), ("false", False), ("No", False), ("off", False),
])
def test_env_booleans(text, expected):
    assert load_config({}, env={"SHOAL_RETAIN_AVAILABLE": text}).retain_available is expected


def test_env_types_are_converted():
    config = load_config({}, env={"SHOAL_SHUTDOWN_GRACE": "2.5", "SHOAL_MAX_QOS": "1",
                                  "SHOAL_LOG_LEVEL": "debug"})
    assert config.shutdown_grace == 2.5 and config.max_qos == 1 and config.log_level == "debug"


@pytest.mark.parametrize("env,words", [
    ({"SHOAL_MQTT_PORT": "99999"}, ["mqtt_port", "SHOAL_MQTT_PORT", "0 to 65535"]),
    ({"SHOAL_ADMIN_PORT": "-1"}, ["admin_port", "0 to 65535"]),
    ({"SHOAL_MQTT_PORT": "abc"}, ["SHOAL_MQTT_PORT", "not an integer"]),
    ({"SHOAL_RETAIN_AVAILABLE": "maybe"}, ["SHOAL_RETAIN_AVAILABLE", "true/false"]),
    ({"SHOAL_MAX_INFLIGHT": "0"}, ["max_inflight", "1 to 65535"]),
    ({"SHOAL_MAX_QUEUE": "0"}, ["max_queue", ">= 1"]),
    ({"SHOAL_MAX_PACKET_SIZE": "15"}, ["max_packet_size", "16 to 268435460"]),
    ({"SHOAL_MAX_PACKET_SIZE": "268435461"}, ["max_packet_size", "16 to 268435460"]),
    ({"SHOAL_LOG_LEVEL": "verbose"}, ["log_level", "debug, info, warning, error"]),
    ({"SHOAL_MAX_QOS": "3"}, ["max_qos", "0 to 2"]),
    ({"SHOAL_SHUTDOWN_GRACE": "-1"}, ["shutdown_grace", ">= 0"]),
    ({"SHOAL_NODE_ID": "a b"}, ["node_id", "without spaces"]),
])
def test_bad_values_raise_config_error_saying_what_to_use(env, words):
    with pytest.raises(ConfigError) as info:
        load_config({}, env=env)
    for word in words:
        assert word in str(info.value)


def test_bad_flag_value_names_the_flag():
    with pytest.raises(ConfigError, match=r"mqtt_port = 70000 \(from --mqtt-port\).*0 to 65535"):
        load_config({"mqtt_port": "70000"}, env={})


def test_unknown_toml_key_is_named_and_valid_keys_listed(tmp_path):
    path = write_toml(tmp_path, "mqtt_port = 1883\nmqt_port = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config({"config": path}, env={})
    message = str(info.value)
    assert "'mqt_port'" in message and path in message
    for f in dataclasses.fields(Config):
        assert f.name in message


def test_toml_value_of_the_wrong_type_is_refused(tmp_path):
    path = write_toml(tmp_path, "mqtt_port = true\n")
    with pytest.raises(ConfigError, match="mqtt_port.*must be an integer"):
        load_config({"config": path}, env={})


def test_toml_value_out_of_range_names_the_file(tmp_path):
    path = write_toml(tmp_path, "max_qos = 5\n")
    with pytest.raises(ConfigError, match=f"max_qos = 5 \\(from {path}\\)"):
        load_config({"config": path}, env={})


def test_missing_or_broken_toml_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config({"config": str(tmp_path / "nope.toml")}, env={})
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config({"config": write_toml(tmp_path, "mqtt_port = = 1")}, env={})


def test_unknown_override_is_refused():
    with pytest.raises(ConfigError, match="unknown option 'mqtt_prot'"):
        load_config({"mqtt_prot": 1}, env={})


def test_config_is_frozen_and_validates_direct_construction():
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.mqtt_port = 1  # type: ignore[misc]
    with pytest.raises(ConfigError, match="max_qos"):
        Config(max_qos=7)


def test_every_field_is_documented():
    for f in dataclasses.fields(Config):
        assert f.metadata.get("help"), f"{f.name} has no help text"
        assert f.type in ("str", "int", "float", "bool"), f"{f.name}: unsupported type {f.type}"


def test_names_of_flags_and_env_vars():
    assert flag("session_expiry_311") == "--session-expiry-311"
    assert env_var("session_expiry_311") == "SHOAL_SESSION_EXPIRY_311"
    assert parse_value("max_inflight", " 12 ") == 12


def test_readme_option_table_matches_config():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert README_BEGIN in readme and README_END in readme, "README lost its option-table markers"
    block = readme.split(README_BEGIN, 1)[1].split(README_END, 1)[0].strip("\n") + "\n"
    assert block == options_markdown(), (
        "README.md's option table is out of date: run `make docs` "
        "(or `python -m node.config README.md`)")


@pytest.mark.parametrize("secret, words", [
    ("change-me", "placeholder"), ("CHANGEME", "placeholder"), ("short-secret", "16"),
])
def test_a_weak_cluster_secret_is_refused_without_being_shown(secret, words):
    with pytest.raises(ConfigError) as err:
        load_config({"cluster_secret": secret})
    assert words in str(err.value) and secret not in str(err.value)
    assert load_config({"cluster_secret": "a" * 16}).cluster_secret == "a" * 16


def test_allow_anonymous_takes_a_toml_boolean(tmp_path):
    path = tmp_path / "shoal.toml"
    path.write_text("allow_anonymous = true\n")
    assert load_config({"config": str(path)}).allow_anonymous == "true"
    with pytest.raises(ConfigError):
        load_config({"allow_anonymous": "maybe"})
