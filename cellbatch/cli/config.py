"""``--config FILE.toml`` (or ``CELLBATCH_CONFIG``): a command's options from a TOML file.

Keys are the options' long names (``cell-diameter = 200``, ``normalise = ["hm:p.json", "display"]``,
``drop-edge = true``; ``sources = [...]`` for the SRC arguments). The file fills click's default map,
so an option given on the command line wins. Relative paths are taken from the current folder, as on
the command line. :func:`resolved_options` records what was used and where each value came from.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

import click

from cellbatch.errors import ConfigError

ENV_VAR = "CELLBATCH_CONFIG"


def config_option(f: Any) -> Any:
    return click.option(
        "--config", "config", type=click.Path(dir_okay=False, path_type=Path), envvar=ENV_VAR, is_eager=True,
        callback=_apply_config, metavar="FILE.toml",
        help=f"Options from a TOML file, by long name (cell-diameter = 200); the command line wins. Env: {ENV_VAR}.",
    )(f)


def _apply_config(ctx: click.Context, param: click.Parameter, path: Path | None) -> Path | None:
    if path is None:
        return None
    values = read_config(path, ctx)
    ctx.default_map = {**(ctx.default_map or {}), **values}
    return path


def read_config(path: Path, ctx: click.Context) -> dict[str, Any]:
    """The file's settings as ``{parameter name: value}``, each checked by its option's type.

    Raises
    ------
    ConfigError
        The file is missing or not TOML, a key names no option of the command, or a value does not fit.
    """
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib

    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist (from --config or ${ENV_VAR})") from exc
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path} is not readable TOML: {exc}") from exc
    by_key = _parameters_by_key(ctx.command)
    values: dict[str, Any] = {}
    for key, value in data.items():
        param = by_key.get(key)
        if param is None:
            raise ConfigError(
                f"config file {path}: {key!r} is no option of cellbatch {ctx.command.name}; "
                f"use long names: {', '.join(sorted(by_key))}"
            )
        if param.multiple or param.nargs == -1:
            value = value if isinstance(value, list) else [value]
        try:
            param.type_cast_value(ctx, value)
        except click.BadParameter as exc:
            raise ConfigError(f"config file {path}: {key} = {value!r}: {exc.message}") from exc
        values[param.name] = value
    return values


def _parameters_by_key(command: click.Command) -> dict[str, click.Parameter]:
    """Each parameter under its long option name without dashes (``cell-diameter``), SRC as ``sources``."""
    keys: dict[str, click.Parameter] = {}
    for param in command.params:
        if param.name in ("config", "help"):
            continue
        if isinstance(param, click.Argument):
            keys[param.name] = param
            continue
        long = [o for o in param.opts if o.startswith("--")]
        if long:
            keys[long[0][2:]] = param
    return keys


def resolved_options(ctx: click.Context) -> dict[str, Any]:
    """What a command ran with: each option's value by long name, where it came from, and the config file."""
    from click.core import ParameterSource

    origin = {ParameterSource.COMMANDLINE: "command line", ParameterSource.ENVIRONMENT: "environment",
              ParameterSource.DEFAULT_MAP: "config", ParameterSource.DEFAULT: "default"}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key, param in _parameters_by_key(ctx.command).items():
        value = ctx.params.get(param.name)
        values[key] = [str(v) for v in value] if isinstance(value, (list, tuple)) else (
            str(value) if isinstance(value, Path) else value)
        sources[key] = origin.get(ctx.get_parameter_source(param.name), "default")
    config = ctx.params.get("config")
    record: dict[str, Any] = {"values": values, "from": sources, "config": None}
    if config is not None:
        record["config"] = {"path": str(config), "sha256": hashlib.sha256(Path(config).read_bytes()).hexdigest()}
    return record
