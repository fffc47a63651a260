"""The contract every vlsi command keeps, table-driven: adding a command = adding rows to the tables below.

- ``--storage-option`` (``-o``) argv reaches the config / the open call as the SAME typed dict in every command;
- ``--help`` is generated from the config dataclass: every CLI field's docstring is in it, and editing a docstring
  changes the help;
- a user error prints exactly ONE line ``error: ...`` on stderr and exits 2; ``--debug`` lets it propagate instead.

Everything here runs in-process with click's CliRunner (stderr is separate in click >= 8.2) and stays cheap: errors
are picked on paths that fail before a model loads.
"""

from __future__ import annotations

import importlib
import sys
import textwrap
from dataclasses import fields

import click
import pytest
from click.testing import CliRunner

from vlsi.common.config import StorageOptions, cli_fields, field_docs
from vlsi.common.errors import VlsiError


def _main(spec: str) -> click.Command:
    """``"pkg.module:attr"`` -> the click command (imported only when a test needs it)."""
    mod, attr = spec.split(":")
    return getattr(importlib.import_module(mod), attr)


def _invoke(spec: str, argv: list[str]):
    return CliRunner().invoke(_main(spec), argv)


EXTRACT_REQUIRED = ["--teacher", "t", "--verbalizers", "v", "--data", "d.json", "--out", "s3://bucket/cache"]
TRAIN_REQUIRED = ["--student", "s", "--data", "d.json", "--out", "o", "--cache", "s3://bucket/cache"]
VERBALIZE_REQUIRED = ["--model", "m", "--data", "d.json", "--out", "o"]

# ---- one typed --storage-option dict everywhere ------------------------------------------------------------------

STORAGE_ARGV = ["-o", "anon=false", "--storage-option", "client_kwargs.endpoint_url=http://x",
                "-o", "max_concurrency=4"]
STORAGE_DICT = {"anon": False, "client_kwargs": {"endpoint_url": "http://x"}, "max_concurrency": 4}

# (command, argv before the storage options, "module:function" the command calls, storage options of that call)
STORAGE_CASES = [
    ("vlsi.extract.cli:main", EXTRACT_REQUIRED, "vlsi.extract.run:run_extract",
     lambda args, kwargs: args[0].storage_options),
    ("vlsi.train.cli:main", TRAIN_REQUIRED, "vlsi.train.recipe:run", lambda args, kwargs: args[0].storage_options),
    ("vlsi.cache_format.cli:main", ["info", "s3://bucket/cache"], "vlsi.cache_format.reader:open_cache",
     lambda args, kwargs: kwargs["storage_options"]),
    ("vlsi.cache_format.cli:main", ["merge", "s3://bucket/a", "s3://bucket/b"], "vlsi.cache_format.compact:merge",
     lambda args, kwargs: kwargs["source_storage_options"]),
]


class _Reached(Exception):
    """Raised by the stand-in of the function a command calls, once the arguments are recorded."""


@pytest.mark.parametrize("cmd,argv,target,storage_of", STORAGE_CASES, ids=lambda v: v if isinstance(v, str) else None)
def test_storage_options_reach_the_call_typed_the_same(cmd, argv, target, storage_of, monkeypatch):
    mod, attr = target.split(":")
    seen = []

    def stand_in(*args, **kwargs):
        seen.append(storage_of(args, kwargs))
        raise _Reached

    monkeypatch.setattr(importlib.import_module(mod), attr, stand_in)
    r = _invoke(cmd, argv + STORAGE_ARGV)
    assert isinstance(r.exception, _Reached), (r.output, r.exception)
    assert seen == [STORAGE_DICT]


# ---- --help is generated from the config fields ------------------------------------------------------------------

# (command, argv to its --help, the dataclass its options come from)
HELP_CASES = [
    ("vlsi.extract.cli:main", [], "vlsi.extract.config:ExtractConfig"),
    ("vlsi.train.cli:main", [], "vlsi.train.config:TrainConfig"),
    ("vlsi.train.cli:verbalize", [], "vlsi.train.config:VerbalizeConfig"),
    ("vlsi.eval.cli:main", ["run"], "vlsi.eval.config:EvalConfig"),
    ("vlsi.eval.cli:main", ["layers"], "vlsi.eval.config:LayersConfig"),
    *[("vlsi.cache_format.cli:main", [sub], "vlsi.common.config:StorageOptions")
      for sub in ("info", "verify", "ls", "stats", "finalize", "compact", "merge")],
]


def _squash(text: str) -> str:
    """Without whitespace: click wraps help anywhere (inside URLs and after hyphens too)."""
    return "".join(text.split())


@pytest.mark.parametrize("cmd,argv,cls", HELP_CASES, ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_help_shows_every_field_docstring(cmd, argv, cls):
    cls = _main(cls)
    r = _invoke(cmd, argv + ["--help"])
    assert r.exit_code == 0, r.output
    docs = field_docs(cls)
    flds = cli_fields(cls) if hasattr(cls, "build") else fields(cls)
    assert flds
    for f in flds:
        assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
        assert _squash(docs[f.name]) in _squash(r.output), f"{f.name}: {docs[f.name]!r} not in --help"


def test_edited_docstring_changes_the_help(tmp_path, monkeypatch):
    from vlsi.common.cli import config_options

    src = '''
        from dataclasses import dataclass
        from vlsi.common.config import Config, opt

        @dataclass(kw_only=True)
        class ToyConfig(Config):
            size: int = 3
            """{doc}"""
            name: str = opt("a", choices=("a", "b"))
            """Which toy."""
    '''
    path = tmp_path / "toy_cli_config.py"
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)

    def help_for(doc: str) -> str:
        path.write_text(textwrap.dedent(src.format(doc=doc)))
        mod = importlib.reload(sys.modules["toy_cli_config"]) if "toy_cli_config" in sys.modules \
            else importlib.import_module("toy_cli_config")
        cmd = click.command()(config_options(mod.ToyConfig)(lambda cfg: click.echo(repr(cfg))))
        return CliRunner().invoke(cmd, ["--help"]).output

    try:
        first = help_for("Toy size in bricks.")
        second = help_for("Height of the tower, in whole bricks.")
    finally:
        sys.modules.pop("toy_cli_config", None)
    assert "Toy size in bricks." in first and "Height of the tower" not in first
    assert "Height of the tower, in whole bricks." in second and "Toy size" not in second
    assert "Which toy." in first and "Which toy." in second and "[default: 3]" in second


# ---- one error path: one line on stderr, exit 2; --debug shows the traceback -------------------------------------


def _not_a_dir(tmp_path):
    (tmp_path / "file").write_text("")
    return ["--out", str(tmp_path / "file" / "demo")]


# (command, argv given tmp_path, words of the error line)
ERROR_CASES = [
    ("vlsi.cache_format.cli:main", lambda t: ["info", str(t / "missing")], "missing"),
    ("vlsi.cache_format.cli:main", lambda t: ["finalize", str(t / "missing")], "missing"),
    ("vlsi.extract.cli:main", lambda t: ["--teacher", "t"], "missing required option(s): --data, --out"),
    ("vlsi.extract.cli:main", lambda t: EXTRACT_REQUIRED + ["--top-k", "0"], "--top-k must be a positive integer"),
    ("vlsi.eval.cli:main", lambda t: ["--model", "m", "--data", str(t / "nope.json")], "--data"),
    ("vlsi.eval.cli:main", lambda t: ["layers", "--model", "m", "--verbalizers", str(t), "--data", str(t / "d.json"),
                                      "--sample", "x", "--compare", "m2"], "--data"),
    ("vlsi.eval.cli:main", lambda t: ["matching", "--run", str(t)], "metrics file not found"),
    ("vlsi.demo.cli:main", _not_a_dir, "Not a directory"),
    ("vlsi.train.cli:main", lambda t: ["--student", "s"], "missing required option(s): --data, --out"),
    ("vlsi.train.cli:main", lambda t: TRAIN_REQUIRED + ["--stages", "sft,interact"], "--stages must be in the order"),
    ("vlsi.train.cli:main", lambda t: TRAIN_REQUIRED[:6] + ["--cache", str(t / "no-cache")], "cannot open cache"),
    ("vlsi.train.cli:verbalize", lambda t: VERBALIZE_REQUIRED + ["--steps", "0"], "--steps must be >= 1"),
    ("vlsi.train.cli:verbalize", lambda t: VERBALIZE_REQUIRED[:4] + ["--out", str(t / "o"), "--config",
                                                                      str(t / "none.yaml")], "config file not found"),
]


@pytest.fixture
def no_debug_env(monkeypatch):
    monkeypatch.delenv("VLSI_DEBUG", raising=False)


@pytest.mark.parametrize("cmd,argv,words", ERROR_CASES, ids=lambda v: v if isinstance(v, str) else None)
def test_user_error_is_one_line_exit_2(cmd, argv, words, tmp_path, no_debug_env):
    r = _invoke(cmd, argv(tmp_path))
    assert r.exit_code == 2, (r.output, r.exception)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], r.stderr


@pytest.mark.parametrize("cmd,argv,words", ERROR_CASES, ids=lambda v: v if isinstance(v, str) else None)
def test_debug_lets_the_error_propagate(cmd, argv, words, tmp_path, no_debug_env):
    r = _invoke(cmd, argv(tmp_path) + ["--debug"])
    assert isinstance(r.exception, (VlsiError, OSError)) and not isinstance(r.exception, SystemExit), r.output
    assert words in str(r.exception) and "error: " not in r.stderr


def test_compare_without_its_verbalizers_is_one_line(tmp_path, no_debug_env):
    data = tmp_path / "d.json"
    data.write_text("[]")
    r = _invoke("vlsi.eval.cli:main", ["layers", "--model", "m", "--verbalizers", str(tmp_path), "--data", str(data),
                                       "--sample", "x", "--compare", "m2"])
    assert r.exit_code == 2 and r.stderr.splitlines() == ["error: --compare and --compare-verbalizers go together"]


def test_bad_ops_impl_is_a_user_error(monkeypatch, no_debug_env):
    """VLSI_OPS_IMPL / impl= mistakes are VlsiErrors (still ValueErrors), so a command reaching vlsi.ops prints one
    line: here vlsi-extract, whose run reaches ``resolve_impl`` with the config's ``ops_impl``."""
    import torch

    from vlsi.ops import OpsError, resolve_impl

    monkeypatch.setenv("VLSI_OPS_IMPL", "cuda")
    with pytest.raises(VlsiError, match="VLSI_OPS_IMPL='cuda'"):
        resolve_impl("auto", torch.device("cpu"))
    with pytest.raises(ValueError, match="impl='fast'"):
        resolve_impl("fast", torch.device("cpu"))
    assert issubclass(OpsError, VlsiError) and issubclass(OpsError, ValueError)

    import vlsi.extract.run

    monkeypatch.setattr(vlsi.extract.run, "run_extract", lambda cfg: resolve_impl(cfg.ops_impl, torch.device("cpu")))
    r = _invoke("vlsi.extract.cli:main", EXTRACT_REQUIRED)
    assert r.exit_code == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert r.stderr.startswith("error: vlsi.ops: environment VLSI_OPS_IMPL='cuda'")
