"""Server configuration: flags, then environment variables, then an optional TOML file, then
defaults (that order of precedence).

Every knob is one field of ServerConfig; its flag is --name-with-dashes, its environment
variable ATTNSERVE_NAME_IN_UPPER_SNAKE_CASE and its key in the file name_with_underscores, so
`attnserve serve --help` lists all three for each.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ENV_PREFIX = "ATTNSERVE_"
# The source tree's shipped model repository: what `attnserve serve` serves with no arguments.
SHIPPED_REPOSITORY = Path(__file__).resolve().parent.parent / "models" / "repository"


def _knob(default: Any, help: str, choices: Sequence[str] | None = None) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


# (setting, lowest, highest, unit): gRPC takes durations as int32 milliseconds (at most ~24.8 days).
DURATION_BOUNDS = (
    ("max_wait_ms", 0.0, 60_000.0, "ms"),
    ("poll_seconds", 0.0, 7 * 24 * 3600.0, "s"),
    ("grace_period", 0.0, 3600.0, "s"),
    ("max_connection_age", 1.0, 24 * 24 * 3600.0, "s"),
    ("http_timeout", 0.0, 3600.0, "s"),
)


@dataclasses.dataclass
class ServerConfig:
    model_repository: str = _knob(str(SHIPPED_REPOSITORY), "model repository: DIR/<model>/<version>/manifest.json")
    default_model: str = _knob("en-fr", "model served to requests that name none")
    host: str = _knob("[::]", "address to listen on")
    port: int = _knob(50051, "gRPC port (0: pick a free one)")
    metrics_port: int = _knob(9464, "Prometheus metrics port, served at /metrics (0: no metrics server)")
    http_port: int = _knob(0, "HTTP/JSON gateway port: LibreTranslate API, /v1 JSON API, playground at / (0: off)")
    http_cors_origins: str = _knob("", "origins allowed to call the HTTP API from browsers, comma-separated ('*': any; "
                                       "empty: no CORS headers)")
    http_timeout: float = _knob(60.0, "deadline in seconds of HTTP requests that set no Request-Timeout header (0: none)")
    device: str = _knob("auto", "execution provider: cuda where a GPU is present (auto), or force one", ["auto", "cpu", "cuda"])
    precision: str = _knob("auto", "graphs to load: auto = fp16 on CUDA when the bundle has it, else fp32",
                           ["auto", "fp32", "fp16", "int8"])
    threads: int = _knob(0, "onnxruntime threads per model, split among its instances (0: all cores)")
    instances: int = _knob(0, "engine instances per model, each with its own scheduler thread and a share of the "
                              "threads; jobs go to the least loaded (0: auto = 2 on CPU with 2+ threads, else 1)")
    step_spinning: int = _knob(0, "1: each instance's decoder-step workers spin between steps rather than sleep (faster "
                                  "for one instance with 2+ threads; 0 when instances share the cores)")
    max_batch_tokens: int = _knob(16384, "most padded source tokens (times beam size) decoded together")
    max_batch_sentences: int = _knob(64, "most sentences decoded together (1 turns batching off)")
    max_wait_ms: float = _knob(1.0, "how long an idle model waits for more sentences before it starts a batch")
    max_queue: int = _knob(4096, "most sentences waiting for a batch; beyond it requests get RESOURCE_EXHAUSTED")
    max_sentences_per_request: int = _knob(256, "most sentences in one Translate request")
    max_tokens_per_sentence: int = _knob(256, "most source subword tokens in one sentence")
    max_characters_per_request: int = _knob(100_000, "most characters of text in one request (all its sentences)")
    max_message_bytes: int = _knob(4 * 1024 * 1024, "largest gRPC message or HTTP request body received (or sent)")
    stream_window: int = _knob(128, "most items of one TranslateStream in flight; beyond, the server stops reading "
                                    "the stream until results go out (HTTP/2 flow control holds the client)")
    glossary_mode: str = _knob("constrained", "how glossary terms are applied: constrained decoding (the term's "
                                              "translation made to appear), or substitute (masked, then replaced)",
                               ["constrained", "substitute"])
    default_beam_size: int = _knob(4, "beam size of requests that ask for none")
    max_beam_size: int = _knob(16, "largest beam size a request may ask for")
    workers: int = _knob(128, "gRPC handler threads: the most requests in flight at once")
    poll_seconds: float = _knob(30.0, "rescan the model repository this often (0: only on SIGHUP)")
    grace_period: float = _knob(20.0, "seconds in-flight requests get to finish after SIGTERM")
    max_connection_age: float = _knob(300.0, "seconds before a client connection is closed (clients then re-resolve)")
    tls_cert: str = _knob("", "PEM certificate chain file: serve TLS (with --tls-key)")
    tls_key: str = _knob("", "PEM private key file")
    auth_token: str = _knob("", "bearer token Translator RPCs must carry (health checks stay open); prefer the env variable")
    auth_token_file: str = _knob("", "file holding the bearer token (e.g. a mounted Secret)")
    api_keys_file: str = _knob("", "file of more client keys, `key [requests_per_minute]` per line (server/auth.py); "
                                   "gRPC: bearer token, HTTP: bearer token or LibreTranslate api_key")
    rate_limit_per_minute: int = _knob(0, "requests a minute per client key, for keys without their own limit (0: none)")
    log_level: str = _knob("INFO", "logging level", ["DEBUG", "INFO", "WARNING", "ERROR"])

    def validate(self) -> None:
        problems = []
        for name in ("max_batch_tokens", "max_batch_sentences", "max_queue", "max_sentences_per_request",
                     "max_tokens_per_sentence", "max_characters_per_request", "max_message_bytes", "default_beam_size", "max_beam_size", "workers",
                     "stream_window"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        for name in ("port", "metrics_port", "http_port"):
            if not 0 <= getattr(self, name) <= 65535:
                problems.append(f"{name} must be a port number")
        # Durations end up in Event.wait, in monotonic-clock sums and in gRPC's int32 millisecond
        # channel arguments: NaN, infinity, negative or absurdly large values are refused here
        # rather than overflowing there.
        for name, low, high, unit in DURATION_BOUNDS:
            value = getattr(self, name)
            if not (math.isfinite(value) and low <= value <= high):
                problems.append(f"{name} must be in [{low:g}, {high:g}] {unit}, got {value!r}")
        if self.rate_limit_per_minute < 0:
            problems.append("rate_limit_per_minute must be >= 0")
        if self.step_spinning not in (0, 1):
            problems.append("step_spinning must be 0 or 1")
        if self.instances < 0 or self.threads < 0:
            problems.append("instances and threads must be >= 0")
        if bool(self.tls_cert) != bool(self.tls_key):
            problems.append("tls_cert and tls_key go together")
        if self.default_beam_size > self.max_beam_size:
            problems.append("default_beam_size exceeds max_beam_size")
        if problems:
            raise ValueError("invalid server configuration: " + "; ".join(problems))

    def token(self) -> str:
        if self.auth_token_file:
            return Path(self.auth_token_file).read_text().strip()
        return self.auth_token

    @staticmethod
    def env_name(name: str) -> str:
        return ENV_PREFIX + name.upper()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help=f"TOML file of settings (env {ENV_PREFIX}CONFIG); keys as the flags, with underscores")
    for field in dataclasses.fields(ServerConfig):
        flag = "--" + field.name.replace("_", "-")
        help_text = f"{field.metadata['help']} [env {ServerConfig.env_name(field.name)}; default {field.default!r}]"
        parser.add_argument(flag, dest=field.name, type=_type(field), default=None, choices=field.metadata["choices"],
                            help=help_text)


def _type(field: dataclasses.Field):
    return {"int": int, "float": float, "str": str}[field.type if isinstance(field.type, str) else field.type.__name__]


def load_config(args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None) -> ServerConfig:
    """Defaults, overridden by the TOML file, then the environment, then the flags."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    config_file = getattr(args, "config", None) or environ.get(ENV_PREFIX + "CONFIG")
    names = {f.name: f for f in dataclasses.fields(ServerConfig)}
    if config_file:
        with open(config_file, "rb") as f:
            data = tomllib.load(f)
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"{config_file}: unknown settings {unknown}")
        values.update(data)
    for name, field in names.items():
        if ServerConfig.env_name(name) in environ:
            try:
                values[name] = _type(field)(environ[ServerConfig.env_name(name)])
            except ValueError as exc:
                raise ValueError(f"{ServerConfig.env_name(name)}: {exc}") from exc
        if args is not None and getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
    config = ServerConfig(**{name: _type(names[name])(value) for name, value in values.items()})
    for name in ("device", "precision", "log_level"):
        choices = names[name].metadata["choices"]
        if getattr(config, name) not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {getattr(config, name)!r}")
    config.validate()
    return config
