"""``TrainConfig``: the flat, typed configuration of ``vlsi-train`` (litgpt-style dataclass, checked on creation).

Precedence: dataclass defaults < config file (``--config file.yaml|.toml``, keys = field names, ``-`` or ``_``) <
command-line options. The effective config is written to ``ODIR/config.yaml`` by the run. Components never take the
whole config: the loop unpacks what each needs into plain arguments.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from vlsi.models.errors import VlsiError

from .names import ADAPTIVE_TEMPS, LOSS_OPS, MATCH_RULES, STAGES

__all__ = ["STAGES", "ConfigError", "TrainConfig", "load_config_file", "build_config"]


class ConfigError(VlsiError):
    """A bad configuration value or file (one line naming the field)."""


@dataclass
class TrainConfig:
    # inputs / outputs -------------------------------------------------------------------------------------------
    student: str
    """Student model: local HF directory, preset name or cached hub id."""
    data: str
    """Dataset file (LLaVA JSON / JSONL / Parquet) whose samples the cache holds."""
    out: str
    """Output directory ODIR (config.yaml, metrics.jsonl, checkpoints/, verbalizers/, final/)."""
    cache: str | None = None
    """Teacher cache URL (local path or fsspec URL) written by ``vlsi-extract``; required by the interact stage
    (``verbalize`` and ``sft`` alone train from the dataset, e.g. to SFT a teacher before extraction)."""
    image_root: str | None = None
    """Folder image paths resolve against (default: the data file's folder)."""
    storage_options: dict = field(default_factory=dict)
    """fsspec storage options for the cache URL."""
    # stages and length ------------------------------------------------------------------------------------------
    stages: tuple[str, ...] = STAGES
    """Stages to run, in this order: verbalize (student verbalizers), interact (VLsI step 2), sft (step 3)."""
    steps: int | None = None
    """Optimizer steps per stage (wins over ``epochs``)."""
    epochs: float = 1.0
    """Epochs over the joined samples per stage when ``steps`` is not given."""
    verbalize_steps: int | None = None
    """Per-stage override of ``steps`` for verbalize."""
    interact_steps: int | None = None
    """Per-stage override of ``steps`` for interact."""
    sft_steps: int | None = None
    """Per-stage override of ``steps`` for sft."""
    batch_size: int = 4
    """Samples per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; losses are normalised by the window's answer-token count."""
    # optimisation ---------------------------------------------------------------------------------------------------
    lr: float = 1e-4
    """Peak learning rate of each stage's cosine schedule."""
    min_lr: float = 1e-6
    """Final learning rate of each stage's cosine schedule."""
    warmup_steps: int = 0
    """Linear warm-up steps at the start of each stage."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float | None = 1.0
    """Gradient-norm clip (None: off)."""
    lora_rank: int = 64
    """LoRA rank on the student LLM's linear layers (alpha defaults to the rank, as in the paper)."""
    lora_alpha: float | None = None
    """LoRA alpha (default: = lora_rank)."""
    lora_dropout: float = 0.0
    """LoRA dropout (paper silent; 0 keeps resume bitwise exact)."""
    full: bool = False
    """Train all LLM weights instead of LoRA."""
    train_all: bool = False
    """Train every parameter (vision tower, projector, embeddings, LM head too), no LoRA: for models trained from
    scratch, like the embedded demo's. The KL terms never send gradient into the head (it defines the space the
    verbalized distributions live in); the SFT term does."""
    seed: int = 0
    """Seed of weights init (LoRA), data order and layer-matching draws."""
    resume: bool = False
    """Continue from the latest checkpoint in ODIR/checkpoints (exact: model, optimizer, scheduler, RNG, data)."""
    # verbalizers -------------------------------------------------------------------------------------------------
    student_verbalizers: str | None = None
    """Use these trained student verbalizers (VDIR) instead of running the verbalize stage."""
    student_layers: tuple[int, ...] | None = None
    """Student target layers for the verbalize stage (default: the preset's, else evenly spaced)."""
    verbalizer_kind: str = "verb-ffn"
    """Verbalizer architecture for the verbalize stage."""
    train_verbalizers: bool = False
    """Also train the student verbalizers during interact (paper silent; default frozen)."""
    # method (METHOD.md; every ablation expressible) --------------------------------------------------------------
    match: str = "multinomial"
    """Layer matching rule: multinomial (Alg. 1) | argmin | random | uniform | bottom-k."""
    match_range: bool = True
    """Restrict student target i's candidates to start .. tl - ts + i."""
    match_order: bool = True
    """Order preservation: the next student target matches strictly deeper."""
    adaptive_temp: str = "scale-over-range"
    """Matching softmax temperature: scale-over-range (paper as printed) | range-over-scale | off (T = 1)."""
    match_scale: float = 2.0
    """The ``scale`` of the adaptive temperature."""
    match_k: int = 2
    """k of the bottom-k rule."""
    il_loss: str = "kld"
    """Intermediate-layer loss: kld | ce | none."""
    ll_loss: str = "kld"
    """Last-layer loss: kld | ce | none."""
    kl_direction: str = "forward"
    """forward = KL(teacher || student) | reverse = KL(student || teacher)."""
    temperature: float = 1.0
    """KL temperature (the cache holds T = 1; see vlsi.ops.coarse_kl for tau != 1)."""
    # data ----------------------------------------------------------------------------------------------------------
    max_length: int | None = None
    """Longest encoded sample; longer ones are bad samples."""
    on_bad_sample: str = "error"
    """error: stop naming the sample; skip: leave it out and report it in ODIR/bad_samples.jsonl."""
    verify_join: str = "full"
    """full: encode every sample before training and compare with the cache; lazy: compare when loaded."""
    num_workers: int = 0
    """DataLoader worker processes reading the cache and encoding samples."""
    prefetch: int = 4
    """Micro-batches each worker reads ahead."""
    # memory / speed -------------------------------------------------------------------------------------------------
    chunk_tokens: int = 1024
    """Answer rows per logits tile in the losses (peak memory ~ chunk x vocab x 4 bytes)."""
    grad_checkpointing: bool = False
    """Recompute decoder activations in backward."""
    device: str | None = None
    """cuda / cpu (default: cuda when available)."""
    dtype: str | None = None
    """Weights dtype: bfloat16 | float32 (default: bf16 on GPU, fp32 on CPU); bf16 autocast on GPU."""
    # outputs --------------------------------------------------------------------------------------------------------
    stop_after: int | None = None
    """Stop (with a checkpoint) after this many optimizer steps of this run: time-sliced jobs, preemption tests."""
    save_every: int = 0
    """Checkpoint every N optimizer steps (0: only at the end of each stage)."""
    keep_checkpoints: int = 2
    """Checkpoints kept (oldest deleted)."""
    tensorboard: bool = False
    """Also write TensorBoard scalars to ODIR/tb (needs the tensorboard package)."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        if isinstance(self.stages, str):
            self.stages = tuple(s.strip() for s in self.stages.split(",") if s.strip())
        self.stages = tuple(self.stages)
        bad = [s for s in self.stages if s not in STAGES]
        if bad or not self.stages:
            raise ConfigError(f"stages: {bad or 'empty'} not in {STAGES}")
        if list(self.stages) != [s for s in STAGES if s in self.stages]:
            raise ConfigError(f"stages must be in the order {','.join(STAGES)}, got {','.join(self.stages)}")
        if isinstance(self.student_layers, str):
            self.student_layers = tuple(int(x) for x in self.student_layers.split(",") if x.strip())
        if self.student_layers is not None:
            self.student_layers = tuple(int(x) for x in self.student_layers)
        _choice("match", self.match, MATCH_RULES)
        _choice("adaptive_temp", self.adaptive_temp, ADAPTIVE_TEMPS)
        _choice("il_loss", self.il_loss, LOSS_OPS)
        _choice("ll_loss", self.ll_loss, LOSS_OPS)
        _choice("kl_direction", self.kl_direction, ("forward", "reverse"))
        _choice("on_bad_sample", self.on_bad_sample, ("error", "skip"))
        _choice("verify_join", self.verify_join, ("full", "lazy"))
        if self.dtype is not None:
            _choice("dtype", self.dtype, ("bfloat16", "float32", "float16"))
        if "interact" in self.stages and not self.cache:
            raise ConfigError("the interact stage needs --cache (a teacher cache written by vlsi-extract)")
        if self.il_loss == "none" and self.ll_loss == "none" and "interact" in self.stages:
            raise ConfigError("il_loss and ll_loss are both 'none': the interact stage would train nothing")
        for name in ("batch_size", "grad_accum", "lora_rank", "match_k", "chunk_tokens", "prefetch", "keep_checkpoints"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("steps", "verbalize_steps", "interact_steps", "sft_steps", "stop_after"):
            v = getattr(self, name)
            if v is not None and int(v) < 1:
                raise ConfigError(f"{name} must be >= 1, got {v}")
        for name in ("warmup_steps", "num_workers", "save_every"):
            if int(getattr(self, name)) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.epochs > 0:
            raise ConfigError(f"epochs must be > 0, got {self.epochs}")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ConfigError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr} min_lr={self.min_lr}")
        if not self.temperature > 0 or not self.match_scale > 0:
            raise ConfigError(f"temperature and match_scale must be > 0, got {self.temperature}, {self.match_scale}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not isinstance(self.storage_options, dict):
            raise ConfigError("storage_options must be a mapping")

    # derived ---------------------------------------------------------------------------------------------------------
    def stage_steps(self, stage: str) -> int | None:
        """Optimizer steps for ``stage`` (None: derive from ``epochs``)."""
        v = getattr(self, f"{stage}_steps")
        return int(v) if v is not None else (int(self.steps) if self.steps is not None else None)

    @property
    def alpha(self) -> float:
        return float(self.lora_alpha) if self.lora_alpha is not None else float(self.lora_rank)

    @property
    def match_kwargs(self) -> dict:
        """Arguments of ``vlsi.train.matching.match_layers``."""
        return dict(rule=self.match, use_range=self.match_range, use_order=self.match_order,
                    adaptive=self.adaptive_temp, scale=self.match_scale, k=self.match_k)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    def save(self, path: str | Path) -> Path:
        """Write the effective config as YAML (loadable again with ``--config``)."""
        import yaml

        p = Path(path)
        p.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        return p


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(allowed)}")


def load_config_file(path: str | Path) -> dict:
    """Read a YAML (``.yaml``/``.yml``) or TOML (``.toml``) config file into a dict of field values."""
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
        raise ConfigError(f"{p}: cannot parse config ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: config file must hold a mapping of option -> value")
    out = {str(k).replace("-", "_"): v for k, v in raw.items()}
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(out) - names)
    if unknown:
        raise ConfigError(f"{p}: unknown config keys {unknown}")
    return out


def build_config(file: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Defaults < ``file`` < ``overrides`` (``None`` overrides are ignored: the option was not given)."""
    values = load_config_file(file) if file else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    missing = [n for n in ("student", "data", "out") if not values.get(n)]
    if missing:
        raise ConfigError(f"missing required option(s): {', '.join('--' + m for m in missing)}")
    try:
        return TrainConfig(**values)
    except TypeError as e:
        raise ConfigError(f"bad config: {e}") from None
