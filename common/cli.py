"""What every command shares: click options generated from a config dataclass, and one error path.

    @click.command()
    @user_errors
    @config_options(TrainConfig, config_file=True)
    @click.option("--json", "as_json", is_flag=True)
    def main(cfg: TrainConfig, as_json): ...

- :func:`config_options` adds one option per CLI field of the config (name, type, choices and help from the field
  and its docstring, the default shown from the dataclass) and hands the command the built config. Every option
  defaults to "not given", so a ``--config`` file's value is overridden only by options the user passed.
- :func:`user_errors` turns every user mistake (a :class:`~vlsi.common.errors.VlsiError`, a missing file) into ONE
  line ``error: <message>`` on stderr and exit status 2. Anything else is a bug and keeps its traceback; ``--debug``
  shows the traceback of user errors too.
"""

from __future__ import annotations

import functools
import os
import sys
import typing

import click

from .config import MISSING, ConfigError, base_type, cli_fields, field_docs, parse_csv, tuple_item
from .errors import VlsiError

__all__ = ["config_options", "user_errors", "CONTEXT"]

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}
"""click context settings of every command."""

_USER_OS_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def user_errors(fn):
    """Decorate a click callback: user errors -> ``error: <one line>``, exit 2; adds ``--debug``."""

    @functools.wraps(fn)
    def wrapper(*args, debug: bool = False, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (VlsiError, *_USER_OS_ERRORS) as e:
            if debug or os.environ.get("VLSI_DEBUG"):
                raise
            click.echo(f"error: {' '.join(str(e).split())}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    # Listed last in --help (click shows params in reverse order of this list).
    wrapper.__dict__.setdefault("__click_params__", []).insert(
        0, click.Option(["--debug"], is_flag=True, help="Show the traceback of an error."))
    return wrapper


def _default_text(f) -> str:
    if f.default is not MISSING:
        d = f.default
    elif f.default_factory is not MISSING:
        d = f.default_factory()
    else:
        return " [required]"
    if d is None or d == {} or d == ():
        return ""
    if isinstance(d, bool):
        return f" [default: {'on' if d else 'off'}]"
    if isinstance(d, tuple):
        d = ",".join(map(str, d))
    return f" [default: {d}]"


def _parser(parse, flag: str):
    def callback(_ctx, _param, value):
        if value is None or value == ():
            return None
        try:
            return parse(value)
        except ConfigError as e:
            raise click.BadParameter(str(e)) from None

    return callback


def field_option(cls, f) -> typing.Callable:
    """The click option of config field ``f`` of ``cls`` (a :class:`Config` or an option group)."""
    flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
    doc = " ".join(field_docs(cls).get(f.name, "").split())
    kw: dict = dict(default=None, help=doc + _default_text(f), metavar=f.metadata.get("metavar"))
    tp = base_type(cls, f.name)
    parse = f.metadata.get("parse")
    decls = [flag, *([f.metadata["short"]] if f.metadata.get("short") else []), f.name]
    if tp is bool:
        decls = [f"{flag}/--no-{flag[2:]}", f.name]
        kw.pop("metavar")
    elif f.metadata.get("choices"):
        kw["type"] = click.Choice([str(c) for c in f.metadata["choices"]])
    elif tuple_item(tp) is not None:
        parse = parse or functools.partial(parse_csv, item=tuple_item(tp), option=flag)
        kw["metavar"] = kw["metavar"] or ("I,J,..." if tuple_item(tp) is int else "A,B,...")
    elif tp is dict or typing.get_origin(tp) is dict:
        kw["multiple"] = True
    elif tp in (int, float):
        kw["type"] = tp
    if parse is not None:
        kw["callback"] = _parser(parse, flag)
    return click.option(*decls, **kw)


def config_options(cls, *, config_file: bool = False, exclude: tuple[str, ...] = ()):
    """Decorator: options for every CLI field of ``cls``; the command receives ``cfg`` (built) plus its other
    options. ``config_file=True`` adds ``--config FILE`` (YAML/TOML, keys = field names)."""
    names = [f.name for f in cli_fields(cls) if f.name not in exclude]

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            values = {n: kwargs.pop(n) for n in names}
            file = kwargs.pop("config_file", None)
            return fn(*args, cfg=cls.build(file, **values), **kwargs)

        for f in reversed([f for f in cli_fields(cls) if f.name in names]):
            wrapper = field_option(cls, f)(wrapper)
        if config_file:
            wrapper = click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
                                   help="YAML/TOML file of options (keys = option names); options given here "
                                        "override it.")(wrapper)
        return wrapper

    return deco
