"""``ExtractConfig``: every knob of one ``vlsi-extract`` run, flat, typed and checked (litgpt ``args.py`` style).

Its fields carry their CLI (:mod:`vlsi.common.config`): ``vlsi-extract``'s options, defaults and help are generated
from them. The CLI builds one of these from argv and hands it to :func:`vlsi.extract.run.run_extract`; components
take plain arguments taken from it, never the config itself.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from vlsi.common.config import Config, DataOptions, DeviceOptions, StorageOptions, opt, parse_kv
from vlsi.common.errors import ConfigError

BACKENDS = ("transformers", "vllm")
OPS_IMPLS = ("auto", "torch", "triton")  # vlsi.ops.dispatch.IMPLS (not imported: it needs torch)


def parse_shard(text: str | tuple[int, int] | None) -> tuple[int, int]:
    """``"I/N"`` (0-based ``I``) -> ``(I, N)``; ``None`` -> ``(0, 1)``. One-line error on anything else."""
    if text is None:
        return (0, 1)
    if isinstance(text, (tuple, list)):
        i, n = text
    else:
        parts = str(text).split("/")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ConfigError(f"--shard must be I/N with 0 <= I < N (e.g. 0/4), got {text!r}")
        i, n = int(parts[0]), int(parts[1])
    if not (n >= 1 and 0 <= i < n):
        raise ConfigError(f"--shard must be I/N with 0 <= I < N (e.g. 0/4), got {i}/{n}")
    return (int(i), int(n))


@dataclass(kw_only=True)
class ExtractConfig(Config, DataOptions, StorageOptions, DeviceOptions):
    """One extraction run. Paths may be local; ``out`` may be any fsspec URL (``storage_options`` are its)."""

    teacher: str = opt()
    """Teacher: local model dir, preset (qwen2-vl-72b) or hub id already in the local HF cache."""
    verbalizers: str | None = opt(None, metavar="VDIR")
    """Verbalizers trained for THIS teacher (the vlsi-verbalize --out folder). Required unless --hidden-states is
    given (a features-only cache then holds the final head's top-k as its one layer row)."""
    out: str = opt(metavar="CACHE")
    """Cache path or fsspec URL (s3://bucket/cache, memory://x)."""
    hidden_states: str = opt("none", choices=("none", "answer", "all"))
    """Also store the teacher's final-layer post-norm hidden states (bf16; --method genrecal's features, cache
    format 1.2 feature hidden-states-v1): answer = at the answer rows, all = also at the question rows (the
    regulariser's input). Transformers backend only."""
    top_k: int = 64
    """Top-k entries kept per answer position and layer (--targets topk)."""
    targets: str = opt("topk", choices=("topk", "sampled"))
    """topk: the k most probable tokens per row; sampled: --samples-per-row draws with replacement from the
    teacher's verbalized distribution, stored as distinct ids + counts (unbiased RS-KD targets; cache format 1.2)."""
    samples_per_row: int = 12
    """Draws per (answer token, layer) with --targets sampled (1..255)."""
    sample_seed: int = 0
    """Seed of the draws (--targets sampled); each batch's generator is seeded from it and the batch's sample ids."""
    encoding: str = "topk1-prevd-dq8-kl1e-2"
    """Value encoding of a new cache (cache_format/SPEC.md section 6; vlsi-cache derive converts later). The default
    (ids as ranks in the previous layer's row, 8-bit log-prob steps, each row cut where its KL to the exact top-k
    reaches 1e-2) is 4.2x smaller than exact on the demo teacher at the same student accuracy (docs/cache_economy.md).
    exact (= fp16-logprob, int32 ids) keeps every entry; or topk1-<plain|sorted|prev|prevd>-<fp16|q8|q6|dq8|dq6>
    [-m<eps>|-kl<tau>]."""
    layers: tuple[int, ...] | None = None
    """Subset of the verbalizers' layers to extract, e.g. 2,6,10 (default: all)."""
    shard: tuple[int, int] | None = opt(None, parse=parse_shard, metavar="I/N")
    """I/N: extract the 1/N of samples whose id hashes to I (N workers share one --out; default 0/1: all)."""
    resume: bool = False
    """Continue after samples of this shard already committed to --out (never recomputed); without it a worker
    refuses to continue a shard it already wrote."""
    batch_size: int | None = None
    """Samples per forward (default 8; 64 with --backend vllm) unless --max-tokens-per-batch is set."""
    max_tokens_per_batch: int | None = None
    """Cap on padded tokens (batch x longest) per forward; batches of similar length are filled up to it."""
    bucket_window: int = 256
    """Samples read ahead and sorted by length before batching: larger = less padding, more host memory."""
    device_map: str | None = opt(None, choices=("auto",))
    """auto: spread a teacher bigger than one GPU over all GPUs (accelerate); --device is then ignored."""
    bad_sample_report: str | None = None
    """Write skipped samples (id, reason) here as JSONL."""
    backend: str = opt("transformers", choices=BACKENDS)
    """Teacher backend: transformers (hooks) or vllm."""
    backend_options: dict = opt({}, flag="--backend-option", metavar="KEY=VALUE",
                                parse=functools.partial(parse_kv, option="--backend-option"))
    """Backend constructor option, repeatable key=value (vllm: any vllm.LLM keyword, e.g.
    gpu_memory_utilization=0.85); overrides the options below."""
    tensor_parallel_size: int = 1
    """vllm backend: GPUs per teacher (tensor parallelism)."""
    vllm_final: str = opt("auto", choices=("auto", "hidden", "logprobs"))
    """vllm backend, final layer: hidden (head runs here), logprobs (vLLM's prompt log-probs, unpadded heads only),
    auto (logprobs when the head is not padded)."""
    ops_impl: str = opt("auto", choices=OPS_IMPLS, cli=False)
    """vlsi.ops.head_topk implementation: auto (Triton on CUDA), torch or triton (env VLSI_OPS_IMPL overrides
    auto)."""
    queue_size: int = opt(8, cli=False)
    """Batches of finished records buffered for the background writer before the forward loop blocks."""
    commit_every: int | None = None
    """Commit at least every N samples (default: by size, 64 MiB of raw top-k data)."""
    commit_seconds: float = 300
    """Also commit a segment once this many seconds passed since the last commit: a crash (preemption, OOM,
    SIGKILL) then loses at most that much teacher time. Smaller = less lost work but more, smaller segments (more
    files and commit records; `vlsi-cache compact` merges them later)."""
    progress: bool = True
    """Progress bar (samples/s, answer tokens/s, ETA) on stderr."""

    def check(self) -> None:
        for name in ("teacher", "data", "out") + (("verbalizers",) if self.hidden_states == "none" else ()):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise ConfigError(f"{self.flag(name)} is required (got {getattr(self, name)!r})"
                                  + (" unless --hidden-states answer|all is given" if name == "verbalizers" else ""))
        if self.hidden_states != "none" and self.backend == "vllm":
            raise ConfigError("--hidden-states needs --backend transformers (the vLLM path returns no final-layer "
                              "hidden states at question rows)")
        if self.verbalizers is None and self.layers is not None:
            raise ConfigError("--layers needs --verbalizers (without them the cache holds the final head only)")
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise ConfigError(f"--top-k must be a positive integer, got {self.top_k!r}")
        self.shard = parse_shard(self.shard)
        if isinstance(self.samples_per_row, bool) or not isinstance(self.samples_per_row, int) \
                or not 1 <= self.samples_per_row <= 255:
            raise ConfigError(f"--samples-per-row must be an integer in 1..255, got {self.samples_per_row!r}")
        if self.targets == "sampled" and self.backend == "vllm":
            raise ConfigError("--targets sampled needs --backend transformers (sampling needs every layer's full "
                              "softmax on this side; the vLLM path returns the final layer as top-k log-probs)")
        from vlsi.cache_format.encodings import canonical_name, get_encoding
        from vlsi.cache_format.errors import SchemaError

        try:
            self.encoding = get_encoding(self.encoding).name
        except SchemaError as e:
            raise ConfigError(f"--encoding: {e}") from None
        self.encoding = canonical_name(self.encoding)
        if self.layers is not None:
            self.layers = tuple(sorted(set(self.layers)))
            if not self.layers or self.layers[0] < 0:
                raise ConfigError(f"--layers must be non-negative layer ids, got {list(self.layers)}")
        for name in ("batch_size", "max_tokens_per_batch", "commit_every"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{self.flag(name)} must be >= 1, got {getattr(self, name)}")
        if isinstance(self.commit_seconds, bool) or not isinstance(self.commit_seconds, (int, float)) \
                or not self.commit_seconds > 0:
            raise ConfigError(f"{self.flag('commit_seconds')} must be a number of seconds > 0, got "
                              f"{self.commit_seconds!r}")
        self.commit_seconds = float(self.commit_seconds)
        if self.batch_size is None and self.max_tokens_per_batch is None:
            # vLLM packs requests itself (no padding): hand it more at once so continuous batching has work.
            self.batch_size = 64 if self.backend == "vllm" else 8
        if self.bucket_window < 1 or self.queue_size < 1:
            raise ConfigError(f"bucket_window and queue_size must be >= 1, got {self.bucket_window}, "
                              f"{self.queue_size}")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"--max-length must be >= 2, got {self.max_length}")
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise ConfigError(f"--tensor-parallel-size must be >= 1, got {self.tensor_parallel_size!r}")
        if self.backend != "vllm" and (self.tensor_parallel_size != 1 or self.vllm_final != "auto"):
            raise ConfigError("--tensor-parallel-size and --vllm-final need --backend vllm")

    def to_dict(self) -> dict:
        """JSON-able view (for the summary); storage options are left out: they may hold credentials."""
        d = super().to_dict()
        d["storage_options"] = sorted(self.storage_options)
        d["shard"] = f"{self.shard[0]}/{self.shard[1]}"
        return d
