"""Server settings and the start-up checks that refuse a server which could not work.

Everything here runs before the model loads: an unusable name, a missing API key beyond
loopback or an empty key file is an error at start, never a server answering 400 or
answering everyone.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from taskling.errors import ConfigError

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
ADAPTER_NAME_RULE = "a letter or digit, then letters, digits, '_', '.', '-' (at most 64 characters)"


class ServeSettings(BaseModel):
    """Server settings; every limit has a default that suits one CPU box."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: SecretStr | None = None  # a SecretStr never prints its value
    name: str = "default"  # the adapter name of RUN_DIR itself
    adapters_dir: Path | None = None  # each sub-directory: a run on the same base, served by its name
    log_url: str | None = None  # SQLAlchemy URL; default sqlite RUN_DIR/predictions.db
    retain_days: float | None = Field(None, gt=0)  # delete logged predictions older than this
    max_batch: int = Field(32, ge=1)  # texts per forward pass
    max_wait_ms: float = Field(2.0, ge=0)  # how long the worker waits to fill a batch
    max_queue: int = Field(256, ge=1)  # requests waiting; beyond: 503
    max_texts: int = Field(64, ge=1)  # texts per request; beyond: 413
    max_text_chars: int = Field(20_000, ge=1)  # characters per text; beyond: 413
    max_body_bytes: int = Field(1_000_000, ge=1024)  # request body; beyond: 413
    retry_after_s: int = Field(1, ge=1)
    threads: int | None = Field(None, ge=1)
    dtype: str = "auto"
    quantize: Literal["int8", "int8-torchao"] | None = None  # dynamic int8 on the CPU (model.quantize.quantize_int8)
    abstain: bool = False  # answer `unknown` under each run's abstain.json threshold (`taskling calibrate`)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name may resolve anywhere


def check_exposure(settings: ServeSettings) -> None:
    """Refuse to bind beyond loopback without an API key."""
    if not is_loopback(settings.host) and settings.api_key is None:
        raise ConfigError(
            f"refusing to listen on {settings.host} without an API key",
            fix="set TASKLING_API_KEY (or --api-key-file), or bind to 127.0.0.1",
        )


def check_name(name: str) -> None:
    """A served adapter name must be one a request can ask for; otherwise every request would get 400."""
    if not ADAPTER_NAME.match(name):
        raise ConfigError(
            f"adapter name {name!r} cannot be served: names are {ADAPTER_NAME_RULE}",
            fix="choose a name like my-model or support_v2 (--name)",
        )


def check_settings(settings: ServeSettings) -> None:
    """Every check that can refuse a server before its model loads."""
    check_exposure(settings)
    check_name(settings.name)


def read_api_key(path: Path) -> str:
    """The API key in `path`; a missing, unreadable or empty file is an error, never "no key"."""
    try:
        key = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(
            f"cannot read the API key file {path}: {err}", fix="point --api-key-file at a readable UTF-8 file"
        ) from None
    if not key:
        raise ConfigError(
            f"the API key file {path} is empty",
            fix="write the key into it, or drop --api-key-file to serve on loopback without a key",
        )
    return key
