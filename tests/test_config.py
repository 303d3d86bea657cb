"""Server settings: flags over environment over file over defaults; bad values refused."""

from __future__ import annotations

import argparse

import pytest

from attnserve.server.config import ServerConfig, add_arguments, load_config


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_precedence_flags_env_file_defaults(tmp_path) -> None:
    file = tmp_path / "serve.toml"
    file.write_text('port = 6000\nmetrics_port = 6001\nmax_wait_ms = 7.5\ndefault_model = "de-en"\n')
    env = {"ATTNSERVE_PORT": "7000", "ATTNSERVE_MAX_QUEUE": "12"}
    config = load_config(parse(["--config", str(file), "--port", "8000"]), env)
    assert config.port == 8000  # flag over env over file
    assert config.max_queue == 12  # env over default
    assert config.metrics_port == 6001 and config.max_wait_ms == 7.5 and config.default_model == "de-en"  # file
    assert config.grace_period == ServerConfig().grace_period  # default
    assert load_config(parse([]), {"ATTNSERVE_CONFIG": str(file)}).port == 6000


@pytest.mark.parametrize("argv, env, file, message", [
    ([], {"ATTNSERVE_PORT": "http"}, None, "ATTNSERVE_PORT"),
    (["--max-queue", "0"], {}, None, "max_queue must be >= 1"),
    (["--tls-cert", "c.pem"], {}, None, "tls_cert and tls_key go together"),
    ([], {"ATTNSERVE_DEVICE": "tpu"}, None, "device must be one of"),
    ([], {}, "prot = 1\n", "unknown settings ['prot']"),
    (["--step-spinning", "2"], {}, None, "step_spinning must be 0 or 1"),
])
def test_bad_settings_are_refused(tmp_path, argv, env, file, message) -> None:
    if file is not None:
        (tmp_path / "bad.toml").write_text(file)
        argv = argv + ["--config", str(tmp_path / "bad.toml")]
    with pytest.raises(ValueError) as error:
        load_config(parse(argv), env)
    assert message in str(error.value)


def test_every_setting_is_documented_in_help() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    text = parser.format_help()
    for name in ServerConfig.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in text and ServerConfig.env_name(name) in text
