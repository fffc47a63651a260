"""Configs of ``vlsi-eval run`` and ``vlsi-eval layers``: their fields carry their CLI (:mod:`vlsi.common.config`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vlsi.common.config import Config, DataOptions, DeviceOptions, opt
from vlsi.common.errors import ConfigError

__all__ = ["EvalConfig", "LayersConfig"]


@dataclass(kw_only=True)
class _ModelOptions(Config, DataOptions, DeviceOptions):
    data: str = opt()
    """Eval data: LLaVA .json/.jsonl/.parquet, or MMBench-style .tsv."""
    model: str = opt()
    """Model directory (e.g. ODIR/final), preset or cached hub id."""
    device_map: str | None = opt(None, choices=("auto",))
    """auto: spread a big model over all GPUs (accelerate); --device is then ignored."""
    out: str | None = None
    """Write the results JSON here."""

    def check(self) -> None:
        for name in ("max_new_tokens", "batch_size", "limit", "max_length"):
            v = getattr(self, name, None)
            if v is not None and v < 1:
                raise ConfigError(f"{self.flag(name)} must be >= 1, got {v}")
        for name, kind in (("data", "file"), ("image_root", "dir"), ("verbalizers", "dir"),
                           ("compare_verbalizers", "dir")):
            v = getattr(self, name, None)
            if v is not None and not (Path(v).is_file() if kind == "file" else Path(v).is_dir()):
                raise ConfigError(f"{self.flag(name)} {v}: no such {'file' if kind == 'file' else 'folder'}")


@dataclass(kw_only=True)
class EvalConfig(_ModelOptions):
    """``vlsi-eval run``: greedy generation over a dataset, scored."""

    max_new_tokens: int = 32
    """Longest generated answer (tokens)."""
    batch_size: int = 8
    """Prompts per generate call (left-padded)."""
    limit: int | None = None
    """Evaluate only the first N samples."""
    predictions: bool = True
    """Keep per-sample predictions in the JSON."""


@dataclass(kw_only=True)
class LayersConfig(_ModelOptions):
    """``vlsi-eval layers``: each verbalizer layer's greedy answer on one sample, optionally for two models."""

    verbalizers: str = opt(metavar="VDIR")
    """The model's verbalizer directory (vlsi-verbalize --out)."""
    sample: str = opt()
    """Id of the sample to show."""
    compare: str | None = None
    """A second model to show side by side (e.g. the teacher)."""
    compare_verbalizers: str | None = opt(None, metavar="VDIR")
    """The second model's verbalizer directory (with --compare)."""
    max_new_tokens: int = 16
    """Longest answer decoded per layer (tokens)."""
    png: str | None = None
    """Write the table as a PNG here."""

    def check(self) -> None:
        super().check()
        if (self.compare is None) != (self.compare_verbalizers is None):
            raise ConfigError("--compare and --compare-verbalizers go together")
