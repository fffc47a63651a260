"""``ExtractConfig``: every knob of one ``vlsi-extract`` run, flat, typed and checked (litgpt ``args.py`` style).

The CLI builds one of these from argv and hands it to :func:`vlsi.extract.run.run_extract`; components take plain
arguments taken from it, never the config itself.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from vlsi.models.errors import VlsiError

BACKENDS = ("transformers", "vllm")
DTYPES = ("auto", "bf16", "fp16", "fp32")


class ConfigError(VlsiError):
    """An invalid combination of extraction options (one line naming the option)."""


def parse_shard(text: str | tuple[int, int] | None) -> tuple[int, int]:
    """``"I/N"`` (0-based ``I``) -> ``(I, N)``; ``None`` -> ``(0, 1)``. One-line error on anything else."""
    if text is None:
        return (0, 1)
    if isinstance(text, tuple):
        i, n = text
    else:
        parts = str(text).split("/")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ConfigError(f"--shard must be I/N with 0 <= I < N (e.g. 0/4), got {text!r}")
        i, n = int(parts[0]), int(parts[1])
    if not (n >= 1 and 0 <= i < n):
        raise ConfigError(f"--shard must be I/N with 0 <= I < N (e.g. 0/4), got {i}/{n}")
    return (int(i), int(n))


def parse_layers(text: str | None) -> tuple[int, ...] | None:
    """``"2,6,10"`` -> ``(2, 6, 10)`` (sorted, unique); ``None``/empty -> ``None`` (= all verbalizer layers)."""
    if text is None or not str(text).strip():
        return None
    try:
        vals = sorted({int(x) for x in str(text).split(",") if x.strip()})
    except ValueError:
        raise ConfigError(f"--layers must be comma-separated layer ids (e.g. 2,6,10), got {text!r}") from None
    return tuple(vals)


def parse_storage_options(items: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """``("key=value", ...)`` -> dict; values ``true``/``false``/ints/floats are converted (fsspec wants types).

    Dotted keys nest (``client_kwargs.endpoint_url=...`` -> ``{"client_kwargs": {"endpoint_url": ...}}``), which is
    how s3fs takes an endpoint.
    """
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--storage-option must be key=value, got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"--storage-option must be key=value, got {item!r}")
        v: Any = value
        low = value.lower()
        if low in ("true", "false"):
            v = low == "true"
        else:
            for conv in (int, float):
                try:
                    v = conv(value)
                    break
                except ValueError:
                    pass
        target = out
        *parents, leaf = key.split(".")
        for p in parents:
            target = target.setdefault(p, {})
            if not isinstance(target, dict):
                raise ConfigError(f"--storage-option {key!r} conflicts with an earlier non-nested value")
        target[leaf] = v
    return out


@dataclass
class ExtractConfig:
    """One extraction run. Paths may be local; ``out`` may be any fsspec URL."""

    teacher: str
    """Local model directory, preset name (``qwen2-vl-72b``) or hub id already in the local HF cache."""
    verbalizers: str
    """Directory written by ``vlsi-verbalize`` for THIS teacher (``verbalizers.json`` + safetensors)."""
    data: str
    """Dataset file: LLaVA ``.json``/``.jsonl`` or ``.parquet``."""
    out: str
    """Cache URL (path, ``file://``, ``s3://``, ``memory://`` ...)."""
    top_k: int = 64
    """Top-k entries kept per (answer position, layer)."""
    image_root: str | None = None
    """Folder relative image paths resolve against (default: the data file's folder)."""
    layers: tuple[int, ...] | None = None
    """Subset of the verbalizers' layers to extract; ``None`` = all of them."""
    shard: tuple[int, int] = (0, 1)
    """``(I, N)``: this worker extracts the samples whose id hashes to ``I`` modulo ``N``."""
    resume: bool = True
    """Skip samples already committed to ``out`` (always safe: committed samples are never recomputed)."""
    batch_size: int | None = None
    """Samples per forward; ``None`` = 8 unless ``max_tokens_per_batch`` is set."""
    max_tokens_per_batch: int | None = None
    """Cap on padded tokens (batch x longest) per forward; batches are filled up to it."""
    bucket_window: int = 256
    """Samples read ahead and sorted by length before batching: larger = less padding, more host memory."""
    max_length: int | None = None
    """Samples longer than this (tokens) are bad samples (see ``on_bad_sample``)."""
    device: str | None = None
    """``cuda``/``cpu``/``cuda:1``; default cuda when available. Ignored with ``device_map``."""
    device_map: str | None = None
    """``auto`` spreads a big teacher over all GPUs (accelerate)."""
    dtype: str = "auto"
    """``auto`` (bf16 on GPU, fp32 on CPU), ``bf16``, ``fp16`` or ``fp32``."""
    on_bad_sample: str = "error"
    """``error``: stop at the first bad sample (nothing half-written); ``skip``: skip it and report it."""
    bad_sample_report: str | None = None
    """Where to write the skipped samples as JSONL (default: next to nothing; the summary still counts them)."""
    backend: str = "transformers"
    """Teacher backend: ``transformers`` (hooks) or ``vllm``."""
    backend_options: dict = field(default_factory=dict)
    """Extra keyword arguments for the backend constructor (vLLM: any ``vllm.LLM`` keyword, e.g.
    ``gpu_memory_utilization``); they override the options below."""
    tensor_parallel_size: int = 1
    """vLLM backend: GPUs per model (vLLM's ``tensor_parallel_size``)."""
    vllm_final: str = "auto"
    """vLLM backend, final layer: ``hidden`` (the head runs here), ``logprobs`` (vLLM's prompt log-probs; unpadded
    heads only) or ``auto`` (logprobs when the head is not padded)."""
    ops_impl: str = "auto"
    """``vlsi.ops.head_topk`` implementation: ``auto`` (Triton on CUDA), ``torch`` or ``triton``."""
    queue_size: int = 8
    """Batches of finished records buffered for the background writer before the forward loop blocks."""
    commit_every: int | None = None
    """Commit a segment at least every this many samples (default: the writer's byte threshold)."""
    storage_options: dict = field(default_factory=dict)
    """fsspec options for ``out`` (credentials, endpoint)."""
    progress: bool = True
    """Show a progress bar (samples/s, answer tokens/s, ETA) on stderr."""

    def __post_init__(self) -> None:
        for name in ("teacher", "verbalizers", "data", "out"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v.strip():
                raise ConfigError(f"--{name.replace('_', '-')} is required (got {v!r})")
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise ConfigError(f"--top-k must be a positive integer, got {self.top_k!r}")
        self.shard = parse_shard(tuple(self.shard) if isinstance(self.shard, list) else self.shard)
        if self.layers is not None:
            self.layers = tuple(sorted({int(x) for x in self.layers}))
            if not self.layers or self.layers[0] < 0:
                raise ConfigError(f"--layers must be non-negative layer ids, got {list(self.layers)}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.max_tokens_per_batch is not None and self.max_tokens_per_batch < 1:
            raise ConfigError(f"--max-tokens-per-batch must be >= 1, got {self.max_tokens_per_batch}")
        if self.batch_size is None and self.max_tokens_per_batch is None:
            # vLLM packs requests itself (no padding): hand it more at once so continuous batching has work.
            self.batch_size = 64 if self.backend == "vllm" else 8
        if self.bucket_window < 1:
            raise ConfigError(f"bucket_window must be >= 1, got {self.bucket_window}")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"--max-length must be >= 2, got {self.max_length}")
        if self.device_map not in (None, "auto"):
            raise ConfigError(f"--device-map must be 'auto' when given, got {self.device_map!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.on_bad_sample not in ("error", "skip"):
            raise ConfigError(f"--on-bad-sample must be 'error' or 'skip', got {self.on_bad_sample!r}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise ConfigError(f"--tensor-parallel-size must be >= 1, got {self.tensor_parallel_size!r}")
        if self.vllm_final not in ("auto", "hidden", "logprobs"):
            raise ConfigError(f"--vllm-final must be auto, hidden or logprobs, got {self.vllm_final!r}")
        if self.backend != "vllm" and (self.tensor_parallel_size != 1 or self.vllm_final != "auto"):
            raise ConfigError("--tensor-parallel-size and --vllm-final need --backend vllm")
        if self.ops_impl not in ("auto", "torch", "triton"):
            raise ConfigError(f"ops_impl must be auto, torch or triton, got {self.ops_impl!r}")
        if self.queue_size < 1:
            raise ConfigError(f"queue_size must be >= 1, got {self.queue_size}")
        if self.commit_every is not None and self.commit_every < 1:
            raise ConfigError(f"--commit-every must be >= 1, got {self.commit_every}")

    def to_dict(self) -> dict:
        """JSON-able view (for the summary); storage options are left out: they may hold credentials."""
        d = asdict(self)
        d["storage_options"] = sorted(self.storage_options)
        d["layers"] = list(self.layers) if self.layers is not None else None
        d["shard"] = f"{self.shard[0]}/{self.shard[1]}"
        return d
