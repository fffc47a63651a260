"""Config dataclasses: fields that carry their CLI, option groups shared by the commands, one way to build them.

A command's config is a flat ``@dataclass(kw_only=True)`` deriving from :class:`Config` and from the option groups
it shares (litgpt ``args.py`` style). Each field says everything about itself, in one place:

- its type (from the annotation), default and help (the attribute docstring under it);
- with :func:`opt`: its allowed ``choices``, whether it is ``resume``-critical (a ``--resume`` with a changed value
  is refused, naming the field), a ``parse`` function for its command-line text, a different ``flag``, or
  ``cli=False`` for fields that are not options.

:mod:`vlsi.common.cli` generates each command's click options from these fields, so a default or a docstring is
written once. Values come from defaults < config file (``--config``) < command line (:meth:`Config.build`).
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import functools
import inspect
import os
import textwrap
import typing
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["opt", "Config", "DataOptions", "LoopOptions", "StorageOptions", "DeviceOptions", "DTYPES",
           "BAD_SAMPLE_POLICIES", "field_docs", "cli_fields", "resume_diff", "load_config_file", "parse_csv_ints",
           "parse_kv", "parse_max_memory"]

DTYPES = ("auto", "bf16", "fp16", "fp32")
"""The one dtype vocabulary of every command (auto: bf16 on GPU, fp32 on CPU)."""
BAD_SAMPLE_POLICIES = ("error", "skip")


def opt(default: Any = MISSING, *, choices=None, resume: bool = False, parse=None, flag: str | None = None,
        short: str | None = None, cli: bool = True, metavar: str | None = None) -> Any:
    """A config field with its CLI metadata (see the module doc). Mutable defaults are copied per instance."""
    md = {"choices": tuple(choices) if choices is not None else None, "resume": resume, "parse": parse,
          "flag": flag, "short": short, "cli": cli, "metavar": metavar}
    if isinstance(default, (dict, list, set)):
        return dataclasses.field(default_factory=functools.partial(copy.deepcopy, default), metadata=md)
    if default is MISSING:
        return dataclasses.field(metadata=md)
    return dataclasses.field(default=default, metadata=md)


def parse_csv_ints(text: str, option: str = "value") -> tuple[int, ...]:
    """``"2,6,10"`` -> ``(2, 6, 10)``; one-line ConfigError naming ``option`` otherwise."""
    try:
        return tuple(int(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"{option} must be comma-separated integers (e.g. 2,6,10), got {text!r}") from None


def _scalar(text: str) -> Any:
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    if text.strip().startswith(("{", "[")):
        import json

        try:
            return json.loads(text)
        except ValueError:
            pass
    return text


def parse_kv(items, option: str = "--option") -> dict[str, Any]:
    """``("key=value", ...)`` -> a typed dict, the same for every command.

    Values: ``true``/``false`` -> bool, ``none``/``null`` -> None, ints, floats, JSON objects/lists, else the text.
    Dotted keys nest (``client_kwargs.endpoint_url=URL`` -> ``{"client_kwargs": {"endpoint_url": URL}}``), which is
    how s3fs takes an endpoint. Errors name ``option``.
    """
    if isinstance(items, dict):
        return dict(items)
    out: dict[str, Any] = {}
    for item in items or ():
        key, eq, value = str(item).partition("=")
        key = key.strip()
        if not eq or not key:
            raise ConfigError(f"{option} must be key=value, got {item!r}")
        target = out
        *parents, leaf = key.split(".")
        for p in parents:
            target = target.setdefault(p, {})
            if not isinstance(target, dict):
                raise ConfigError(f"{option} {key!r} conflicts with an earlier non-nested value")
        target[leaf] = _scalar(value)
    return out


def parse_max_memory(items, option: str = "--max-memory") -> dict:
    """``"0:70GiB,1:70GiB,cpu:200GiB"`` (or repeated items, or a mapping from a config file) -> accelerate's
    ``max_memory`` dict ``{0: "70GiB", 1: "70GiB", "cpu": "200GiB"}``.

    Keys: a GPU index, ``cpu`` or ``disk``. Sizes: a number with a unit (``70GiB``, ``500MB``) or a bare number of
    GiB (``70`` -> ``"70GiB"``). One-line ConfigError naming ``option`` otherwise.
    """
    import re

    if items is None:
        return {}
    if isinstance(items, dict):
        pairs = list(items.items())
    else:
        texts = [items] if isinstance(items, str) else list(items)
        pairs = []
        for text in texts:
            for part in str(text).split(","):
                if not part.strip():
                    continue
                key, sep, size = part.rpartition(":")
                if not sep:
                    raise ConfigError(f"{option} must be DEVICE:SIZE items (e.g. 0:70GiB,1:70GiB,cpu:200GiB), "
                                      f"got {part.strip()!r}")
                pairs.append((key, size))
    out: dict = {}
    for key, size in pairs:
        k = str(key).strip().lower()
        if k.isdigit():
            k = int(k)
        elif k.startswith("cuda:") and k[5:].isdigit():
            k = int(k[5:])
        elif k not in ("cpu", "disk"):
            raise ConfigError(f"{option}: device {key!r} is not a GPU index, cpu or disk")
        if isinstance(size, (int, float)) and not isinstance(size, bool):
            size = f"{size}GiB"
        size = str(size).strip()
        if re.fullmatch(r"\d+(\.\d+)?", size):
            size += "GiB"
        if not re.fullmatch(r"\d+(\.\d+)?\s*([KMG]i?B)", size, flags=re.IGNORECASE):
            raise ConfigError(f"{option}: size {size!r} of device {key!r} is not like 70GiB, 500MB or 70")
        out[k] = size.replace(" ", "").upper().replace("IB", "iB")
    return out


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` from the attribute docstrings of ``cls`` and its bases (read from the source)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):  # no source (frozen app): options keep working without help
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for a, b in zip(body, body[1:]):
            if (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr)
                    and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)):
                docs[a.target.id] = inspect.cleandoc(b.value.value)
    return docs


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def base_type(cls: type, name: str) -> Any:
    """The annotation of field ``name`` without ``| None``: ``int``, ``str``, ``tuple[int, ...]``, ``dict`` ..."""
    hint = _hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
        return args[0]
    return hint


def cli_fields(cls: type) -> list[dataclasses.Field]:
    """The command-line fields of ``cls``: its own first, then each option group's, in base-class order."""
    rank = {}
    for klass in cls.__mro__:
        for name in vars(klass).get("__annotations__", {}):
            rank.setdefault(name, len(rank))
    return sorted((f for f in fields(cls) if f.metadata.get("cli", True)), key=lambda f: rank.get(f.name, 0))


def tuple_item(tp) -> type | None:
    """``int`` for ``tuple[int, ...]``, ``str`` for ``tuple[str, ...]``, else None."""
    return typing.get_args(tp)[0] if typing.get_origin(tp) is tuple and typing.get_args(tp)[:1] in ((int,), (str,)) \
        else None


def parse_csv(text, item: type, option: str) -> tuple:
    """``"a,b"`` or a sequence -> a tuple of ``item``; int items are checked (one line naming ``option``)."""
    if item is int:
        return parse_csv_ints(text, option) if isinstance(text, str) else tuple(int(x) for x in text)
    return tuple(s.strip() for s in text.split(",") if s.strip()) if isinstance(text, str) else tuple(text)


@dataclass(kw_only=True)
class Config:
    """Base of every command config: checks choices, normalises int tuples, then calls :meth:`check`."""

    def __post_init__(self) -> None:
        cls = type(self)
        for f in fields(self):
            v = getattr(self, f.name)
            tp = base_type(cls, f.name)
            if v is not None and tuple_item(tp) is not None:
                v = parse_csv(v, tuple_item(tp), self.flag(f.name))
                setattr(self, f.name, v)
            choices = f.metadata.get("choices")
            if choices and v is not None and not isinstance(v, tuple) and v not in choices:
                raise ConfigError(f"{self.flag(f.name)} must be one of {', '.join(map(str, choices))}, got {v!r}")
            if f.default is MISSING and f.default_factory is MISSING and v in (None, ""):
                raise ConfigError(f"{self.flag(f.name)} is required")
        self.check()

    def check(self) -> None:
        """Cross-field checks of a command (one ConfigError naming the option); fields are already typed."""

    @classmethod
    def flag(cls, name: str) -> str:
        f = next((f for f in fields(cls) if f.name == name), None)
        return (f.metadata.get("flag") if f is not None else None) or "--" + name.replace("_", "-")

    @classmethod
    def build(cls, file: str | Path | None = None, **overrides: Any):
        """Defaults < ``file`` (YAML/TOML) < ``overrides``; ``None`` overrides mean "not given"."""
        values = load_config_file(file, cls) if file else {}
        values.update({k: v for k, v in overrides.items() if v is not None})
        missing = [cls.flag(f.name) for f in fields(cls)
                   if f.default is MISSING and f.default_factory is MISSING and values.get(f.name) in (None, "")]
        if missing:
            raise ConfigError(f"missing required option(s): {', '.join(missing)}")
        try:
            return cls(**values)
        except TypeError as e:
            raise ConfigError(f"bad config: {e}") from None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def resume_key(self) -> dict:
        """The resume-critical fields (``opt(resume=True)``) and their values."""
        d = self.to_dict()
        return {f.name: d[f.name] for f in fields(self) if f.metadata.get("resume")}

    def save(self, path: str | Path, *, exclude: tuple[str, ...] = ()) -> Path:
        """Write the effective config as YAML (loadable again with ``--config``); ``exclude`` e.g. credentials."""
        import yaml

        p = Path(path)
        tmp = p.with_name(p.name + f".tmp{os.getpid()}")
        tmp.write_text(yaml.safe_dump({k: v for k, v in self.to_dict().items() if k not in exclude}, sort_keys=False))
        tmp.replace(p)  # readers (other ranks checking a resume) never see half a file
        return p


def resume_diff(saved: dict, cfg: Config) -> list[str]:
    """Resume-critical fields whose value in ``cfg`` differs from ``saved`` (a config dict written earlier)."""
    new = cfg.resume_key()
    return [f"{cfg.flag(k)} ({saved.get(k)!r} -> {v!r})" for k, v in new.items() if saved.get(k) != v]


def load_config_file(path: str | Path, cls: type | None = None) -> dict:
    """A YAML (``.yaml``/``.yml``) or TOML (``.toml``) file of field values; keys use ``-`` or ``_``."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        if p.suffix == ".toml":
            import tomllib

            raw = tomllib.loads(p.read_text())
        elif p.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(p.read_text()) or {}
        else:
            raise ConfigError(f"{p}: config file must be .yaml, .yml or .toml")
    except ConfigError:
        raise
    except Exception as e:  # yaml.YAMLError / tomllib.TOMLDecodeError: name the file
        raise ConfigError(f"{p}: cannot parse config ({' '.join(str(e).split())})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: config file must hold a mapping of option -> value")
    out = {str(k).replace("-", "_"): v for k, v in raw.items()}
    if cls is not None:
        unknown = sorted(set(out) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"{p}: unknown config keys {unknown}")
    return out


# ---- option groups shared by the commands ------------------------------------------------------------------------


@dataclass(kw_only=True)
class DataOptions:
    data: str = opt()
    """Dataset file: LLaVA-style .json / .jsonl, or .parquet with embedded image bytes."""
    image_root: str | None = None
    """Folder relative image paths resolve against (default: the data file's folder)."""
    max_length: int | None = opt(None, resume=True)
    """Longest encoded sample in tokens (images expanded); longer ones are bad samples."""
    on_bad_sample: str = opt("error", choices=BAD_SAMPLE_POLICIES, resume=True)
    """error: stop at the first bad sample, naming it; skip: leave it out and report it."""


@dataclass(kw_only=True)
class LoopOptions:
    """The training engine's knobs (vlsi.train.engine): length, batches, AdamW + its schedule, checkpoints."""

    steps: int | None = opt(None, resume=True)
    """Optimizer steps per stage (default: one epoch)."""
    epochs: float | None = opt(None, resume=True)
    """Epochs per stage when --steps is not given (default 1)."""
    batch_size: int = opt(4, resume=True)
    """Samples per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step and rank; losses are normalised by the step's answer-token count. A resume
    may change it (and the number of ranks) when the global batch, ranks x --batch-size x --grad-accum, stays."""
    lr: float = opt(1e-4, resume=True)
    """Peak learning rate of each stage's schedule."""
    min_lr: float = opt(1e-6, resume=True)
    """Final learning rate of each stage's schedule."""
    schedule: str = opt("auto", choices=("auto", "cosine", "linear"), resume=True)
    """Learning-rate decay after the warm-up, from --lr to --min-lr, restarted per stage: cosine (VLsI), linear
    (GenRecal), or auto: linear for --method genrecal, cosine otherwise."""
    warmup_steps: int = opt(0, resume=True)
    """Linear warm-up steps at the start of each stage."""
    weight_decay: float = opt(0.0, resume=True)
    """AdamW weight decay."""
    max_grad_norm: float | None = opt(1.0, resume=True)
    """Gradient-norm clip (0 or none: off)."""
    seed: int = opt(0, resume=True)
    """Seed of weight init, data order and layer-matching draws."""
    resume: bool = False
    """Continue from OUT/checkpoints (exact: weights, optimizer, scheduler, RNG, data position)."""
    save_every: int = 0
    """Checkpoint every N optimizer steps (0: only at the end of each stage)."""
    keep_checkpoints: int = 2
    """Checkpoints kept (oldest deleted)."""
    stop_after: int | None = None
    """Stop (with a checkpoint) after this many optimizer steps of this run: time-sliced jobs, preemption tests."""
    chunk_tokens: int = 1024
    """Answer rows per logits tile in the losses (peak memory ~ chunk x vocab x 4 bytes)."""
    progress: bool = True
    """Show a progress bar with rates."""

    def check_loop(self) -> None:
        if self.steps is not None and self.epochs is not None:
            raise ConfigError("pass --steps or --epochs, not both")
        for name in ("batch_size", "grad_accum", "keep_checkpoints", "chunk_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{Config.flag(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("steps", "stop_after"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{Config.flag(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "save_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{Config.flag(name)} must be >= 0, got {getattr(self, name)}")
        if self.epochs is not None and not self.epochs > 0:
            raise ConfigError(f"--epochs must be > 0, got {self.epochs}")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ConfigError(f"need --lr > 0 and 0 <= --min-lr <= --lr, got {self.lr} and {self.min_lr}")
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            raise ConfigError(f"--max-grad-norm must be >= 0, got {self.max_grad_norm}")


@dataclass(kw_only=True)
class StorageOptions:
    storage_options: dict = opt({}, flag="--storage-option", short="-o", metavar="KEY=VALUE",
                                parse=functools.partial(parse_kv, option="--storage-option"))
    """fsspec option for remote URLs, repeatable key=value (e.g. client_kwargs.endpoint_url=http://127.0.0.1:9000,
    anon=false)."""


@dataclass(kw_only=True)
class DeviceOptions:
    device: str | None = None
    """Torch device: cuda, cuda:1 or cpu (default: cuda when available)."""
    dtype: str = opt("auto", choices=DTYPES, resume=True)
    """Weights dtype: auto (bf16 on GPU, fp32 on CPU), bf16, fp16 or fp32."""
