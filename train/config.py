"""The configs of ``vlsi-train`` and ``vlsi-verbalize``: flat typed dataclasses whose fields generate the CLIs.

Shared option groups (data, training loop, storage, device) come from :mod:`vlsi.common.config`; the fields below
are each command's own. ``opt(resume=True)`` marks what a ``--resume`` may not change (the run refuses, naming the
field). Precedence: defaults < ``--config file.yaml|.toml`` < command-line options; the effective config is
written to ``OUT/config.yaml``. Components never take the whole config: recipes unpack plain arguments.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from vlsi.common.config import (Config, ConfigError, DataOptions, DeviceOptions, LoopOptions, StorageOptions, opt,
                                parse_max_memory)
from vlsi.models.names import REC_INITS, REC_NORMS, VERBALIZER_KINDS

from .names import ADAPTIVE_TEMPS, DIRECTIONS, LOSS_OPS, MATCH_RULES, METHOD_STAGES, METHODS, STAGES

__all__ = ["ConfigError", "TrainConfig", "VerbalizeConfig"]


@dataclass(kw_only=True)
class JoinOptions:
    verify_join: str = opt("lazy", choices=("full", "lazy"))
    """lazy: check each sample (against the cache, when there is one) when it is loaded: start-up reads no sample;
    full: also load and check every sample once before training, with a progress bar."""


@dataclass(kw_only=True)
class VerbalizeConfig(Config, DataOptions, JoinOptions, LoopOptions, StorageOptions, DeviceOptions):
    """``vlsi-verbalize``: train the verbalizers of a frozen model (VLsI step 1)."""

    model: str = opt(resume=True)
    """Model: local model directory, preset (e.g. qwen2-vl-7b) or cached hub id."""
    out: str = opt()
    """Output folder: verbalizers.safetensors + verbalizers.json, metrics.jsonl, checkpoints/, config.yaml."""
    layers: tuple[int, ...] | None = opt(None, resume=True)
    """Target layers, e.g. 2,6,10 (default: the preset's, else the family's rule for the model's depth)."""
    kind: str = opt("verb-ffn", choices=VERBALIZER_KINDS, resume=True)
    """Verbalizer architecture (verb-ffn is the paper's)."""
    device_map: str | None = opt(None, choices=("auto",))
    """auto: spread a frozen model bigger than one GPU over all GPUs (accelerate); each verbalizer then lives on
    its layer's GPU, the loss runs on the LM head's; --device is ignored."""
    max_memory: dict = opt({}, parse=functools.partial(parse_max_memory, option="--max-memory"),
                           metavar="DEVICE:SIZE,...")
    """With --device-map auto: memory per device for the model's weights, e.g. 0:60GiB,1:70GiB,cpu:200GiB (a bare
    number is GiB); leave room on each GPU for its verbalizers' fp32 weights, Adam state and activations."""

    def check(self) -> None:
        self.check_loop()
        self.max_memory = parse_max_memory(self.max_memory, option="--max-memory")  # a config file's mapping too
        if self.max_memory and self.device_map is None:
            raise ConfigError("--max-memory needs --device-map auto")


@dataclass(kw_only=True)
class TrainConfig(Config, DataOptions, JoinOptions, LoopOptions, StorageOptions, DeviceOptions):
    """``vlsi-train``: the student from a teacher cache, verbalize -> interact -> sft (VLsI), or recalibrate ->
    joint -> sft (``--method genrecal``: teacher and student with different tokenizers)."""

    method: str = opt("vlsi", choices=METHODS, resume=True)
    """vlsi: teacher and student share the tokenizer, the cache holds top-k distributions; genrecal: any student
    tokenizer, the cache holds the teacher's final hidden states and --teacher-head supplies the head."""
    # inputs / outputs ---------------------------------------------------------------------------------------------
    student: str = opt(resume=True)
    """Student model: local HF directory, preset name or cached hub id."""
    out: str = opt()
    """Output directory ODIR (config.yaml, metrics.jsonl, checkpoints/, verbalizers/, final/)."""
    cache: str | None = opt(None, resume=True)
    """Teacher cache URL (local path or fsspec URL) written by vlsi-extract; required by the interact stage
    (verbalize and sft alone train from the dataset, e.g. to SFT a teacher before extraction)."""
    # stages and length ----------------------------------------------------------------------------------------------
    stages: tuple[str, ...] | None = opt(None, resume=True)
    """Comma-separated stages to run, in this order (default: all of the method's): vlsi: verbalize (student
    verbalizers), interact (step 2), sft (step 3); genrecal: recalibrate (Recalibrator only), joint (Recalibrator +
    student), sft (student alone)."""
    verbalize_steps: int | None = opt(None, resume=True)
    """Steps of the verbalize stage (overrides --steps)."""
    interact_steps: int | None = opt(None, resume=True)
    """Steps of the interact stage (overrides --steps)."""
    sft_steps: int | None = opt(None, resume=True)
    """Steps of the sft stage (overrides --steps)."""
    recalibrate_steps: int | None = opt(None, resume=True)
    """Steps of GenRecal's recalibrate stage (overrides --steps)."""
    joint_steps: int | None = opt(None, resume=True)
    """Steps of GenRecal's joint stage (overrides --steps)."""
    # what trains ------------------------------------------------------------------------------------------------------
    lora_rank: int = opt(64, resume=True)
    """LoRA rank on the student LLM's linear layers (alpha defaults to the rank, as in the paper)."""
    lora_alpha: float | None = opt(None, resume=True)
    """LoRA alpha (default: = lora rank)."""
    lora_dropout: float = opt(0.0, resume=True)
    """LoRA dropout (paper silent; 0 keeps resume bitwise exact)."""
    full: bool = opt(False, resume=True)
    """Train all LLM weights instead of LoRA."""
    vision_lr_scale: float = opt(1.0, resume=True)
    """Learning rate of the vision encoder (and projector) as a multiple of --lr, when it trains (--train-all): a
    vision tower trained from scratch wants a smaller step than the language model."""
    train_all: bool = opt(False, resume=True)
    """Train every parameter (vision tower, projector, embeddings, LM head too), no LoRA: for models trained from
    scratch, like the embedded demo's. The KL terms never send gradient into the head (it defines the space the
    verbalized distributions live in); the SFT term does."""
    # verbalizers ----------------------------------------------------------------------------------------------------
    student_verbalizers: str | None = opt(None, resume=True)
    """Use these trained student verbalizers (VDIR) instead of running the verbalize stage."""
    student_layers: tuple[int, ...] | None = opt(None, resume=True)
    """Student target layers for the verbalize stage (default: the preset's, else the family's rule for the
    student's depth)."""
    verbalizer_kind: str = opt("verb-ffn", choices=VERBALIZER_KINDS, resume=True)
    """Verbalizer architecture for the verbalize stage."""
    train_verbalizers: bool = opt(False, resume=True)
    """Also train the student verbalizers during interact (paper silent; default frozen)."""
    # method (docs/method.md "Step 2"; every ablation expressible) ---------------------------------------------------
    match: str = opt("multinomial", choices=MATCH_RULES, resume=True)
    """Layer matching rule: multinomial (Alg. 1) | argmin | random | uniform | bottom-k."""
    match_range: bool = opt(True, resume=True)
    """Restrict student target i's candidates to start .. tl - ts + i."""
    match_order: bool = opt(True, resume=True)
    """Order preservation: the next student target matches strictly deeper."""
    adaptive_temp: str = opt("scale-over-range", choices=ADAPTIVE_TEMPS, resume=True)
    """Matching softmax temperature: scale-over-range (paper as printed) | range-over-scale | off (T = 1)."""
    match_scale: float = opt(2.0, resume=True)
    """The scale of the adaptive temperature."""
    match_k: int = opt(2, resume=True)
    """k of the bottom-k rule."""
    il_loss: str = opt("kld", choices=LOSS_OPS, resume=True)
    """Intermediate-layer loss: kld | ce | none."""
    ll_loss: str = opt("kld", choices=LOSS_OPS, resume=True)
    """Last-layer loss: kld | ce | none."""
    kl_direction: str = opt("forward", choices=DIRECTIONS, resume=True)
    """forward = KL(teacher || student) | reverse = KL(student || teacher)."""
    temperature: float = opt(1.0, resume=True)
    """KL temperature (the cache holds T = 1; see vlsi.ops.coarse_kl for tau != 1)."""
    # GenRecal (docs/method.md "GenRecal") ---------------------------------------------------------------------------
    teacher_head: str | None = opt(None, resume=True)
    """--method genrecal: the teacher model (directory, preset or hub id) whose final norm + LM head read the
    Recalibrator's output; only those tensors are loaded. Must match the features' teacher fingerprint. Unused by
    --method vlsi."""
    rec_blocks: int = opt(2, resume=True)
    """Decoder blocks (the student family's, the student's width) in the Recalibrator."""
    rec_norm: str = opt("layernorm", choices=REC_NORMS, resume=True)
    """The Recalibrator's output norm: layernorm (paper) | rmsnorm."""
    rec_init: str = opt("random", choices=REC_INITS, resume=True)
    """Recalibrator init: random | identity (blocks pass through, proj-post inverts proj-pre, the norm carries the
    teacher's final-norm weight: teacher-only input reproduces the teacher)."""
    genrecal_reg: float = opt(1.0, resume=True)
    """Weight of the regulariser (the same losses on teacher-only input; needs question features); 0: off."""
    genrecal_reg_rows: str = opt("question", choices=("question", "answer"), resume=True)
    """The regulariser's teacher-only input: question = [pre(z_T question) ; pre(z_T answer)] (the paper's; needs a
    --hidden-states all cache), answer = pre(z_T answer) alone (an answer-only cache suffices)."""
    genrecal_kl_weight: float = opt(1.0, resume=True)
    """Weight of KL(teacher || recalibrated) in the Recalibrator losses."""
    genrecal_ce_weight: float = opt(1.0, resume=True)
    """Weight of CE(teacher answer ids) in the Recalibrator losses."""
    student_ce_weight: float = opt(1.0, resume=True)
    """Weight of the student's own CE on its answer tokens in the joint stage."""
    # data loading and speed -----------------------------------------------------------------------------------------
    num_workers: int = 0
    """DataLoader worker processes reading the cache and encoding samples."""
    prefetch: int = 4
    """Micro-batches each worker reads ahead."""
    grad_checkpointing: bool = False
    """Recompute decoder activations in backward."""
    parallel: str = opt("auto", choices=("auto", "ddp", "fsdp"))
    """Under torchrun: ddp (weights replicated, gradients summed by one all-reduce) or fsdp (FSDP2: the student's
    decoder layers and trunk sharded over the ranks with their gradients and AdamW state; --full / --train-all
    only); auto: fsdp for a full fine-tune on GPUs when its weights, gradients and AdamW state exceed half of one
    GPU, else ddp. Checkpoints are the same in every mode: a resume may change it."""
    tensorboard: bool = False
    """Also write TensorBoard scalars to ODIR/tb (needs the tensorboard package)."""

    def check(self) -> None:
        self.check_loop()
        allowed = METHOD_STAGES[self.method]
        if self.schedule == "auto":  # each paper's schedule: GenRecal decays linearly, VLsI by a cosine
            self.schedule = "linear" if self.method == "genrecal" else "cosine"
        if self.stages is None:
            self.stages = allowed
        stages = list(self.stages)
        bad = [s for s in stages if s not in allowed]
        if bad or not stages:
            other = [m for m, st in METHOD_STAGES.items() if m != self.method and bad and set(bad) <= set(st)]
            hint = f" (those are --method {other[0]}'s)" if other else ""
            raise ConfigError(f"--stages: {bad or 'empty'} not in {','.join(allowed)} of --method {self.method}{hint}")
        if stages != [s for s in STAGES if s in stages]:
            raise ConfigError(f"--stages must be in the order {','.join(allowed)}, got {','.join(stages)}")
        if self.method == "genrecal" and ("recalibrate" in stages or "joint" in stages) and not self.teacher_head:
            raise ConfigError("--method genrecal needs --teacher-head T (the teacher whose head reads the features)")
        if self.rec_blocks < 1:
            raise ConfigError(f"--rec-blocks must be >= 1, got {self.rec_blocks}")
        for name in ("genrecal_reg", "genrecal_kl_weight", "genrecal_ce_weight", "student_ce_weight"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{self.flag(name)} must be >= 0, got {getattr(self, name)}")
        if "interact" in stages and not self.cache:
            raise ConfigError("the interact stage needs --cache (a teacher cache written by vlsi-extract)")
        if self.il_loss == "none" and self.ll_loss == "none" and "interact" in stages:
            raise ConfigError("--il-loss and --ll-loss are both 'none': the interact stage would train nothing")
        for name in ("lora_rank", "match_k", "prefetch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{self.flag(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("verbalize_steps", "interact_steps", "sft_steps", "recalibrate_steps", "joint_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{self.flag(name)} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ConfigError(f"--num-workers must be >= 0, got {self.num_workers}")
        if not self.temperature > 0 or not self.match_scale > 0:
            raise ConfigError(f"--temperature and --match-scale must be > 0, got {self.temperature}, "
                              f"{self.match_scale}")
        if not self.vision_lr_scale > 0:
            raise ConfigError(f"--vision-lr-scale must be > 0, got {self.vision_lr_scale}")
        if self.parallel == "fsdp" and not (self.full or self.train_all):
            raise ConfigError("--parallel fsdp shards a full fine-tune: add --full or --train-all (LoRA trains a "
                              "small set next to frozen weights: --parallel ddp)")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")

    # derived ----------------------------------------------------------------------------------------------------------
    def stage_steps(self, stage: str) -> int | None:
        """Optimizer steps for ``stage`` (None: derive from ``epochs``)."""
        v = getattr(self, f"{stage}_steps")
        return v if v is not None else self.steps

    @property
    def alpha(self) -> float:
        return float(self.lora_alpha) if self.lora_alpha is not None else float(self.lora_rank)

    @property
    def match_kwargs(self) -> dict:
        """Arguments of ``vlsi.train.matching.match_layers``."""
        return dict(rule=self.match, use_range=self.match_range, use_order=self.match_order,
                    adaptive=self.adaptive_temp, scale=self.match_scale, k=self.match_k)
