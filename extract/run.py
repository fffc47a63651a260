"""``run_extract(config) -> summary``: the extraction loop, top to bottom.

    dataset --(reader thread: shard filter, resume filter, encode, length-bucket)--> bounded queue of batches
      --(this thread: teacher forward, verbalizers + head + top-k, layer by layer)--> bounded queue of results
      --(writer thread: device->host, CacheWriter.append, compress, commit)--> CACHE

Three stages, two bounded queues: the teacher never waits for reading/encoding or for compression/storage, and
memory stays bounded (back-pressure) when either side is slower. Every sample's record is exactly what
``compute.layer_topk`` gives for its answer rows; the order inside this worker's part is the batch order, which
depends only on the data (so the same inputs give the same cache contents).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from vlsi.common.errors import ConfigError, VlsiError
from vlsi.extract.config import ExtractConfig

TOOL_NAME = "vlsi-extract"
_END = object()


class ExtractError(VlsiError):
    """A refusal or failure of the extraction run (one line)."""


def tool_version() -> str:
    try:
        from importlib.metadata import version

        return f"{TOOL_NAME} {version('vlsi')}"
    except Exception:  # noqa: BLE001 - not installed as a distribution (source checkout)
        return f"{TOOL_NAME} unknown"


# ------------------------------------------------------------------------------------------------------------
# teacher + verbalizers + fingerprint


def verbalizer_identity(vset: Any, vdir: str | Path) -> dict:
    """``{hash, kind, layers}`` of a verbalizer set: the hash of its weights file as ``verbalizers.json`` records."""
    vdir = Path(vdir)
    h = getattr(vset, "weights_sha256", None) or getattr(vset, "hash", None)
    if not h:
        meta = vdir / "verbalizers.json"
        if meta.is_file():
            import json

            d = json.loads(meta.read_text())
            h = d.get("hash") or d.get("weights_sha256") or d.get("weights_hash")
    if not h:
        files = sorted(vdir.glob("*.safetensors"))
        if not files:
            raise ExtractError(f"{vdir}: no verbalizer weights (*.safetensors)")
        sha = hashlib.sha256()
        for f in files:
            sha.update(f.read_bytes())
        h = sha.hexdigest()
    return {"hash": str(h), "kind": str(vset.kind), "layers": [int(x) for x in vset.layers]}


#: the fingerprint's ``verbalizers`` of a features-only cache (no --verbalizers: the final head is the one layer)
NO_VERBALIZERS = {"hash": "", "kind": "none", "layers": []}


def build_fingerprint(teacher_fp: dict, verbalizers: dict, target_layers, *, top_k: int, vocab_size: int,
                      padded_vocab_size: int, value_encoding: str = "fp16-logprob", targets: str = "topk",
                      samples_per_row: int = 0, hidden_states: str = "none", hidden_size: int = 0):
    """The cache fingerprint: the teacher adapter's identity, the verbalizers' identity, the layers and k."""
    from vlsi.cache_format import Fingerprint

    teacher = {k: v for k, v in teacher_fp.items() if k not in ("tokenizer_hash", "processor")}
    return Fingerprint(
        teacher=teacher,
        verbalizers=dict(verbalizers),
        target_layers=tuple(int(x) for x in target_layers),
        tokenizer_hash=str(teacher_fp["tokenizer_hash"]),
        processor=dict(teacher_fp.get("processor") or {}),
        vocab_size=int(vocab_size),
        padded_vocab_size=int(padded_vocab_size),
        top_k=int(samples_per_row) if targets == "sampled" else int(top_k),
        value_encoding=value_encoding,
        targets=targets,
        samples_per_row=int(samples_per_row) if targets == "sampled" else 0,
        hidden_states=hidden_states,
        hidden_size=int(hidden_size) if hidden_states != "none" else 0,
        temperature=1.0,
        tool_version=tool_version(),
        created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )


def choose_layers(requested, available) -> tuple[int, ...]:
    """``requested`` (or all of ``available``) after checking it is a subset of the verbalizers' layers."""
    available = tuple(sorted(int(x) for x in available))
    if requested is None:
        return available
    missing = sorted(set(requested) - set(available))
    if missing:
        raise ConfigError(f"--layers {missing} have no verbalizer; the verbalizers cover layers {list(available)}")
    return tuple(sorted(requested))


_VLLM_DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}


def _load_teacher(config: ExtractConfig):
    """(teacher adapter-like object, backend) for ``config.backend``."""
    from vlsi.models import load_model, torch_dtype

    if config.backend == "transformers":
        from vlsi.extract.backends.transformers_backend import TransformersBackend

        adapter = load_model(config.teacher, dtype=torch_dtype(config.dtype), device=config.device,
                             device_map=config.device_map)
        return adapter, TransformersBackend(adapter)
    # vLLM runs the decoder in its own workers; the project's side of the final layer (tokenizer, final norm, LM
    # head, vocab sizes, fingerprint) comes from a head-only load: no second copy of the decoder in this process.
    from vlsi.extract.backends.vllm_backend import VllmBackend
    from vlsi.models.head_only import load_head_only

    teacher = load_head_only(config.teacher, dtype=torch_dtype(config.dtype), device=config.device)
    opts = {"tensor_parallel_size": config.tensor_parallel_size, "final": config.vllm_final,
            # the decoder runs in the head's dtype (--dtype auto: bf16 on GPU, fp32 on CPU, as the transformers
            # backend); vLLM's own "auto" would follow the checkpoint or pick bf16 on CPU
            "dtype": _VLLM_DTYPES[str(teacher.dtype).removeprefix("torch.")], "vocab_size": teacher.vocab_size}
    if teacher.is_vlm:  # vLLM expands one placeholder per image itself; its image processor must match ours
        opts.update(image_token_id=teacher.bundle.image_token_id, image_processor=teacher.bundle.image_processor)
    if config.max_length is not None:  # vLLM counts the one sampled token against max_model_len
        opts["max_model_len"] = config.max_length + 1
    opts.update(config.backend_options)  # --backend-option wins
    backend = VllmBackend(str(teacher.model_dir), top_k=config.top_k, **opts)
    if backend.padded_vocab_size != teacher.padded_vocab_size or backend.num_layers != teacher.num_layers:
        backend.close()
        raise ExtractError(f"{config.teacher}: vLLM sees {backend.num_layers} layers / {backend.padded_vocab_size} "
                           f"head rows, the checkpoint {teacher.num_layers} / {teacher.padded_vocab_size}")
    return teacher, backend


def load_teacher_verbalizers(vdir: str, teacher: Any):
    """Load the verbalizers, refusing a set trained for another model; move them next to the LM head."""
    from vlsi.models import load_verbalizers

    if not hasattr(teacher, "text_model"):
        meta = Path(vdir) / "verbalizers.json"
        kind = json.loads(meta.read_text()).get("kind") if meta.is_file() else None
        if kind == "decoder":  # a decoder block needs the teacher's rotary embedding, which a vLLM run does not load
            raise ExtractError(f"{meta}: 'decoder' verbalizers need --backend transformers (the vllm backend "
                               "supports verb-ffn, ffn and mlp)")
    # adapter= binds the teacher's rotary embedding (decoder-kind verbalizers); a vLLM teacher view has none.
    kw = {"adapter": teacher} if hasattr(teacher, "text_model") else {}
    vset = load_verbalizers(vdir, expect_fingerprint=teacher.fingerprint(), **kw)
    w = teacher.lm_head.weight
    vset = vset.to(device=w.device, dtype=w.dtype)
    vset.eval()
    vset.requires_grad_(False)
    return vset


# ------------------------------------------------------------------------------------------------------------
# the reader thread: data -> encoded, length-bucketed batches


class _Reader:
    """Reads, filters (shard, resume), encodes and buckets samples in a thread; yields batches as lists of
    ``(Encoded, images)`` (images are empty unless ``with_images``)."""

    def __init__(self, config: ExtractConfig, bundle: Any, data: Any, todo: "Todo", policy: Any, *,
                 with_images: bool = False, max_batches: int = 4):
        self.config = config
        self.with_images = with_images
        self.bundle = bundle
        self.data, self.todo = data, todo
        self.policy = policy
        self.n_committed_skipped = todo.n_committed
        self.n_other_shards = todo.n_other_shards
        self.padded_tokens = 0
        self.real_tokens = 0
        self.busy_s = 0.0  # reading + encoding time (in the reader thread)
        self.wait_s = 0.0  # time the forward loop waited for a batch (input starvation)
        self._q: queue.Queue = queue.Queue(maxsize=max_batches)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vlsi-extract-reader", daemon=True)

    def start(self) -> "_Reader":
        self._thread.start()
        return self

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _emit(self, window: list) -> bool:
        from vlsi.extract.batching import length_batches

        lengths = [e.length for e, _ in window]
        for b in length_batches(lengths, batch_size=self.config.batch_size,
                                max_tokens_per_batch=self.config.max_tokens_per_batch):
            self.real_tokens += sum(lengths[i] for i in b)
            self.padded_tokens += len(b) * max(lengths[i] for i in b)
            if not self._put([window[i] for i in b]):
                return False
        return True

    def _run(self) -> None:
        from vlsi.models import BadSampleError, encode_sample

        cfg = self.config
        try:
            window: list = []
            for i in self.todo.indices:
                if self._stop.is_set():
                    return
                t0 = time.perf_counter()
                try:
                    sample = self.data[int(i)]  # the record and its images are read here, one sample at a time
                except BadSampleError as err:
                    self.policy.handle(err)
                    continue
                enc = encode_sample(sample, self.bundle, max_length=cfg.max_length, policy=self.policy)
                self.busy_s += time.perf_counter() - t0
                if enc is None:  # skipped by the policy (recorded in its report)
                    continue
                # Backends running their own processor (vLLM) also get the decoded PIL images.
                window.append((enc, sample.pil_images() if self.with_images else ()))
                if len(window) >= cfg.bucket_window:
                    if not self._emit(window):
                        return
                    window = []
            if window and not self._emit(window):
                return
            self._put(_END)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer's thread
            self._put(e)

    def __iter__(self) -> Iterator[list]:
        while True:
            t0 = time.perf_counter()
            item = self._q.get()
            self.wait_s += time.perf_counter() - t0
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


@dataclass
class Todo:
    """The samples this worker extracts: dataset indices (file order) of its shard that are not committed yet."""

    indices: Any
    n_other_shards: int
    n_committed: int


def shard_todo(data: Any, shard: tuple[int, int], committed: set[str]) -> Todo:
    """One pass over the dataset index's ids (no record or image is read)."""
    import numpy as np

    from vlsi.cache_format import in_shard

    mine, ids = [], []
    for i in range(len(data)):
        sid = data.sample_id(i)
        if in_shard(sid, shard):
            mine.append(i)
            ids.append(sid)
    # a cache writer's committed ids answer many lookups at once (millions of ids on a resume)
    many = getattr(committed, "contains_many", None)
    done = many(ids) if many is not None else np.array([sid in committed for sid in ids], dtype=bool)
    keep = np.asarray(mine, dtype=np.int64)[~done] if len(mine) else np.zeros(0, np.int64)
    return Todo(keep, len(data) - len(mine), int(done.sum()))


# ------------------------------------------------------------------------------------------------------------
# the loop


def _requests_of(batch: list, *, all_rows: bool = False):
    """Backend requests; ``all_rows`` asks for every row 0..T-2 (verbalizers that attend over the sequence)."""
    import torch

    from vlsi.extract.backends.base import TeacherRequest

    return [TeacherRequest(e.sample_id, e.input_ids,
                           torch.arange(e.length - 1) if all_rows else e.answer_positions,
                           dict(e.model_inputs), images)
            for e, images in batch]


def _context_verbalizer(vset, encs, device):
    """For ``decoder`` verbalizers: run on all rows of each sample, keep the answer rows (batch order).

    Rows 0..T-2 suffice: the block is causal, so dropping the last token changes no earlier row.
    Returns (verbalizer callable, answer-row selection index).
    """
    import torch

    counts = [e.length - 1 for e in encs]
    sel, off = [], 0
    for e, n in zip(encs, counts):
        sel.append(e.answer_positions.long() + off)
        off += n
    sel = torch.cat(sel).to(device)
    return (lambda i, h: vset(i, h, row_counts=counts)[sel]), sel


def _row_selection(encs):
    """For outputs of rows 0..T-2 per sample, concatenated in batch order: the indices of the answer rows, of the
    question rows (``cache_format.features.question_rows``), and each sample's question-row count."""
    import torch

    from vlsi.cache_format.features import question_rows

    sel, qsel, counts, off = [], [], [], 0
    for e in encs:
        ap = e.answer_positions.long()
        q = torch.from_numpy(question_rows(ap.numpy(), e.length))
        sel.append(ap + off)
        qsel.append(q + off)
        counts.append(int(q.numel()))
        off += e.length - 1
    return torch.cat(sel), torch.cat(qsel), counts


def _meta_of(e) -> Any:
    import numpy as np

    from vlsi.extract.compute import SampleMeta

    return SampleMeta(e.sample_id, e.content_hash, e.input_ids.numpy().astype(np.int32),
                      e.answer_positions.numpy().astype(np.int32))


def _gather_outputs(outputs, layers):
    """Concatenate per-sample backend outputs back into batch rows (views are cheap; rows follow batch order)."""
    import torch

    from vlsi.ops import TopK

    layer_hidden = {i: torch.cat([o.layer_hidden[i] for o in outputs]) for i in layers}
    if all(o.final_hidden is not None for o in outputs):
        return layer_hidden, torch.cat([o.final_hidden for o in outputs]), None
    if all(o.final_topk is not None for o in outputs):
        f = [o.final_topk for o in outputs]
        return layer_hidden, None, TopK(torch.cat([t.ids for t in f]), torch.cat([t.logprobs for t in f]),
                                        torch.cat([t.tail for t in f]))
    raise ExtractError("backend output must set final_hidden or final_topk for every sample")


def _batch_generator(seed: int, encs, device):
    """The draws' generator of one batch: seeded from ``seed`` and the batch's sample ids (a rerun of the same
    batches draws the same targets; which batch a sample lands in depends on the bucketing)."""
    import hashlib

    import torch

    h = hashlib.blake2b(f"{seed}\0".encode() + "\0".join(e.sample_id for e in encs).encode(), digest_size=8)
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(h.digest(), "little") & ((1 << 63) - 1))
    return g


def open_writer(config: ExtractConfig, fp):
    """A ``CacheWriter`` for this worker's part (N workers may create the same new cache at once: the writer
    resolves that race itself and compares fingerprints)."""
    from vlsi.cache_format import CacheWriter

    return CacheWriter(config.out, fp, shard=config.shard, storage_options=config.storage_options or None,
                       resume=True, commit_every=config.commit_every, commit_seconds=config.commit_seconds)


def run_extract(config: ExtractConfig, *, teacher: Any = None, backend: Any = None, on_batch=None) -> dict:
    """Run one extraction worker; returns the JSON-able summary.

    ``teacher``/``backend`` may be passed already loaded (benchmarks, tests reuse one model); otherwise they are
    built from ``config``. ``on_batch(n_samples, n_answer_rows)`` is called after each computed batch.
    """
    from vlsi.cache_format import open_cache
    from vlsi.cache_format.errors import CacheNotFoundError
    from vlsi.extract.compute import BatchResult, head_spec_of, layer_sampled, layer_topk
    from vlsi.cache_format import in_shard
    from vlsi.extract.writer_thread import BackgroundWriter
    from vlsi.models.data import BadSamplePolicy, BadSampleReport
    from vlsi.models.dataset import open_dataset

    import torch

    t_start = time.perf_counter()
    report = BadSampleReport()
    policy = BadSamplePolicy(config.on_bad_sample, report)
    # The data first (an index: built once, reused): a bad dataset fails before a big teacher loads.
    data = open_dataset(config.data, image_root=config.image_root, storage_options=config.storage_options,
                        progress=config.progress)
    for err in data.bad_entries:
        policy.handle(err)
    if teacher is None or backend is None:
        teacher, backend = _load_teacher(config)
    vset = load_teacher_verbalizers(config.verbalizers, teacher) if config.verbalizers else None
    layers = choose_layers(config.layers, vset.layers) if vset is not None else ()
    for i in layers:
        if not 0 <= i < int(teacher.num_layers):
            raise ConfigError(f"layer {i} is outside the teacher's decoder layers 0..{teacher.num_layers - 1}")
    fp = build_fingerprint(teacher.fingerprint(),
                           verbalizer_identity(vset, config.verbalizers) if vset is not None else NO_VERBALIZERS,
                           layers, top_k=config.top_k, vocab_size=teacher.vocab_size,
                           padded_vocab_size=teacher.padded_vocab_size, value_encoding=config.encoding,
                           targets=config.targets, samples_per_row=config.samples_per_row,
                           hidden_states=config.hidden_states, hidden_size=int(teacher.hidden_size))
    head = head_spec_of(teacher)

    stats = {"samples": 0, "answer_tokens": 0, "input_tokens": 0, "batches": 0, "forward_s": 0.0, "topk_s": 0.0}
    needs_images = bool(getattr(backend, "needs_images", False))
    reader = bar = None
    # The CacheWriter context commits what was appended even when the loop fails (those records are complete).
    with open_writer(config, fp) as writer:
        try:
            committed = writer.committed_ids()
            n_mine = 0 if config.resume else sum(1 for s in committed if in_shard(s, config.shard))
            if n_mine:
                raise ExtractError(
                    f"{config.out}: already holds {n_mine} committed samples of shard "
                    f"{config.shard[0]}/{config.shard[1]}; pass --resume to continue after them")
            todo = shard_todo(data, config.shard, committed)
            if config.progress:
                from tqdm import tqdm

                bar = tqdm(total=len(todo.indices), unit="sample", dynamic_ncols=True,
                           desc=f"extract {config.shard[0]}/{config.shard[1]}")
            reader = _Reader(config, teacher.bundle, data, todo, policy, with_images=needs_images).start()
            t_loop = time.perf_counter()
            with BackgroundWriter(writer, max_items=config.queue_size) as bg:
                for batch in reader:
                    encs = [e for e, _ in batch]
                    t0 = time.perf_counter()
                    context = vset is not None and vset.needs_context
                    all_rows = context or config.hidden_states == "all"
                    outputs = backend.run(_requests_of(batch, all_rows=all_rows), layers)
                    layer_hidden, final_hidden, final_topk = _gather_outputs(outputs, layers)
                    verbalizer = vset.forward if vset is not None else None
                    hidden_q = q_counts = None
                    if all_rows:  # rows 0..T-2 of every sample came back: select the answer (and question) rows
                        sel, qsel, q_counts = _row_selection(encs)
                        if context:
                            verbalizer, _ = _context_verbalizer(vset, encs, head.head_weight.device)
                        else:
                            layer_hidden = {i: h[sel.to(h.device)] for i, h in layer_hidden.items()}
                        if config.hidden_states == "all":
                            hidden_q = final_hidden[qsel.to(final_hidden.device)].to(torch.bfloat16)
                        final_hidden = final_hidden[sel.to(final_hidden.device)] if final_hidden is not None else None
                        if final_topk is not None:
                            final_topk = type(final_topk)(*(t[sel.to(t.device)] for t in final_topk))
                    hidden_a = None
                    if config.hidden_states != "none":
                        if final_hidden is None:
                            raise ExtractError("--hidden-states: the backend returned no final hidden states")
                        hidden_a = final_hidden.to(torch.bfloat16)  # SPEC 5b: stored as bf16 bit patterns
                    t1 = time.perf_counter()
                    counts = None
                    if config.targets == "sampled":
                        if final_hidden is None:
                            raise ExtractError("--targets sampled: the backend returned no final hidden states")
                        topk, counts = layer_sampled(layer_hidden, final_hidden, layers=layers, verbalizer=verbalizer,
                                                     head=head, n=config.samples_per_row,
                                                     generator=_batch_generator(config.sample_seed, encs,
                                                                                head.head_weight.device))
                    else:
                        topk = layer_topk(layer_hidden, final_hidden, layers=layers, verbalizer=verbalizer,
                                          head=head, k=config.top_k, final_topk=final_topk, impl=config.ops_impl)
                    del layer_hidden, final_hidden, outputs
                    t2 = time.perf_counter()
                    # blocks when the writer lags; the writer commits a segment per segment_bytes (hidden states
                    # included), so a shard's features never sit in memory all at once
                    bg.put(BatchResult([_meta_of(e) for e in encs], topk, counts, hidden_a, hidden_q, q_counts))
                    n_ans = sum(int(e.answer_positions.numel()) for e in encs)
                    stats["samples"] += len(encs)
                    stats["answer_tokens"] += n_ans
                    stats["input_tokens"] += sum(e.length for e in encs)
                    stats["batches"] += 1
                    stats["forward_s"] += t1 - t0
                    stats["topk_s"] += t2 - t1
                    if on_batch is not None:
                        on_batch(len(encs), n_ans)
                    if bar is not None:
                        el = max(time.perf_counter() - t_loop, 1e-9)
                        bar.update(len(encs))
                        bar.set_postfix_str(f"{stats['samples'] / el:.1f} samples/s, "
                                            f"{stats['answer_tokens'] / el:.0f} answer tok/s", refresh=False)
            writer.close()  # commit the last segment inside the timed loop: its compression + storage count too
            loop_s = max(time.perf_counter() - t_loop, 1e-9)  # includes draining the writer queue
        finally:
            if reader is not None:
                reader.stop()
            if bar is not None:
                bar.close()
    if config.bad_sample_report:
        report.write(config.bad_sample_report)

    try:
        info = open_cache(config.out, storage_options=config.storage_options or None).info()
    except CacheNotFoundError:
        info = {"n_samples": 0, "n_answer_tokens": 0, "bytes_on_disk": 0, "bytes_per_answer_token": None}
    padded = reader.padded_tokens if reader else 0
    return {
        "cache": config.out,
        "shard": f"{config.shard[0]}/{config.shard[1]}",
        "part": writer.part,
        "backend": getattr(backend, "name", type(backend).__name__),
        "layers": [*map(int, layers), "final"],
        "top_k": fp.top_k,
        "targets": config.targets,
        "value_encoding": fp.value_encoding,
        "hidden_states": fp.hidden_states,
        "written": stats["samples"],
        "answer_tokens": stats["answer_tokens"],
        "input_tokens": stats["input_tokens"],
        "batches": stats["batches"],
        "already_committed": reader.n_committed_skipped if reader else 0,
        "other_shards": reader.n_other_shards if reader else 0,
        "skipped": report.count,
        "skipped_samples": [{"id": e.id, "reason": e.reason} for e in report.entries[:50]],
        "padding_fraction": (1.0 - reader.real_tokens / padded) if padded else 0.0,
        "elapsed_s": time.perf_counter() - t_start,
        "loop_s": loop_s,
        "forward_s": stats["forward_s"],
        "topk_s": stats["topk_s"],
        "encode_s": reader.busy_s if reader else 0.0,
        "input_wait_s": reader.wait_s if reader else 0.0,
        "writer_busy_s": bg.busy_s,
        "writer_blocked_s": bg.blocked_s,
        "samples_per_s": stats["samples"] / loop_s,
        "answer_tokens_per_s": stats["answer_tokens"] / loop_s,
        "cache_samples": info["n_samples"],
        "cache_answer_tokens": info["n_answer_tokens"],
        "bytes_on_disk": info["bytes_on_disk"],
        "bytes_per_answer_token": info["bytes_per_answer_token"],
    }
