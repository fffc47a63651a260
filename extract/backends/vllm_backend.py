"""The vLLM teacher backend: teacher-forced prefill under vLLM, hidden states from hooks inside the vLLM workers.

How it works (vLLM >= 0.32 V1 engine; see docs/vllm.md for what was verified and on which version):

- Each request is a ``TokensPrompt`` of the exact ids the cache records, with ``max_tokens=1`` (the one sampled
  token is thrown away) and ``skip_reading_prefix_cache=True``: a prefix-cache hit would skip the forward of the
  cached positions, and their hidden states would never pass our hooks.
- ``worker_extension_cls`` mixes :class:`VllmHiddenStateExtension` into every vLLM worker; ``collective_rpc`` calls
  its methods by name (no pickled callables, so it works with the default multiprocess engine and with tensor
  parallelism). Its forward hooks on the decoder layers (and the final norm) keep only the rows of the answer
  positions that travel with each request in ``SamplingParams.extra_args``. Continuous batching packs several
  requests into one flat token batch: the hook maps rows back to requests through the runner's ``query_start_loc``
  and each request's ``num_computed_tokens`` (chunked prefill included), and checks that mapping against the
  ``positions`` the model was called with.
- vLLM's decoder layers return ``(hidden, residual)`` with the residual add fused into the next norm: decoder layer
  ``i``'s output in the project's sense (transformers' ``hidden_states[i + 1]``, before the final norm) is
  ``hidden + residual``, computed in the hook before the next layer's in-place fused norm overwrites them.
- Final layer, two modes. ``"hidden"``: the final norm's output at the answer rows (``TeacherOutput.final_hidden``),
  the loop applies the LM head with ``vlsi.ops`` exactly as for the transformers backend. ``"logprobs"``: vLLM's
  prompt log-probs (``logprobs_mode="raw_logprobs"``, ``flat_logprobs=True``) become ``final_topk``. vLLM
  normalises over ALL head rows (``config.vocab_size``), padded ones included, while the project normalises over the
  real vocabulary; so ``"logprobs"`` is only allowed when the head is not padded, and ``"auto"`` picks it then.
- Alignment: vLLM's prompt log-probs at position ``p`` are the distribution of token ``p`` given ``ids[:p]``, i.e.
  the logits computed at row ``p - 1``. The project's row ``t`` predicts token ``t + 1``, so row ``t`` reads
  vLLM position ``t + 1``.

vLLM is imported lazily: this module imports without it (the main environment cannot install it next to a newer
transformers); constructing :class:`VllmBackend` without vLLM raises :class:`VllmNotInstalledError`.
"""

from __future__ import annotations

import io
import itertools
from typing import Any, Sequence

import torch

from vlsi.extract.backends.base import TeacherBackend, TeacherOutput, TeacherRequest

__all__ = ["VllmBackend", "VllmHiddenStateExtension", "VllmNotInstalledError", "vllm_available", "FINAL_MODES"]

FINAL_MODES = ("auto", "hidden", "logprobs")
EXTENSION_CLS = "vlsi.extract.backends.vllm_backend.VllmHiddenStateExtension"
_KEY = "vlsi_key"
_ROWS = "vlsi_rows"


def _error_base() -> type[Exception]:
    # vlsi.models.errors.VlsiError when available (the CLI prints it as one line); plain RuntimeError otherwise,
    # so the worker extension below never needs vlsi.models inside the vLLM worker processes.
    try:
        from vlsi.models.errors import VlsiError
    except ImportError:  # pragma: no cover - vlsi.models is part of the project
        return RuntimeError
    return VlsiError


class VllmNotInstalledError(_error_base()):  # type: ignore[misc]
    """vLLM cannot be imported in this interpreter."""


class VllmBackendError(_error_base()):  # type: ignore[misc]
    """A request or a configuration the vLLM backend cannot serve (one line, naming the sample or option)."""


def vllm_available() -> bool:
    """True when ``import vllm`` works in this interpreter (without importing it twice on failure paths)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def _import_vllm():
    try:
        import vllm  # noqa: F401
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
    except ImportError as exc:  # also OSError-free ImportErrors from a broken torchvision, reported as is
        raise VllmNotInstalledError(
            f"vLLM is not installed (or fails to import: {exc}): run scripts/vllm_env.sh / pip install vlsi[vllm]"
        ) from exc
    return vllm, LLM, SamplingParams, TokensPrompt


# ---------------------------------------------------------------------------------------------------------------
# Worker side: mixed into vLLM's worker class; runs inside the engine/worker processes.
# ---------------------------------------------------------------------------------------------------------------


def _find_decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The module holding ``layers`` (decoder blocks) and ``norm`` (final norm) in vLLM's model classes."""
    candidates = [model]
    for name in ("model", "language_model"):
        sub = getattr(model, name, None)
        if sub is not None:
            candidates.append(sub)
            inner = getattr(sub, "model", None)
            if inner is not None:
                candidates.append(inner)
    for c in candidates:
        if isinstance(getattr(c, "layers", None), torch.nn.ModuleList) and hasattr(c, "norm"):
            return c
    raise RuntimeError(f"vlsi: cannot find decoder layers + final norm in vLLM model {type(model).__name__}")


def _residual_rows(out: Any, rows: torch.Tensor) -> torch.Tensor:
    """Decoder layer output at ``rows`` -> the residual stream after the layer (transformers' ``hidden_states[i+1]``).

    Index before adding: only the answer rows are materialised, and the add makes a new tensor, so the next
    layer's in-place fused add-norm cannot change what we keep.
    """
    if isinstance(out, tuple):
        h, res = out[0], (out[1] if len(out) > 1 else None)
        return h[rows] if res is None else h[rows] + res[rows]
    return out[rows]


class VllmHiddenStateExtension:
    """Worker extension (``LLM(worker_extension_cls=...)``): answer-row hidden states captured by forward hooks.

    ``vlsi_install_hooks(layers, capture_final)`` once after the engine starts; after each ``generate``,
    ``vlsi_pop_captured()`` returns (``torch.save`` bytes of) ``{key: {"pos": int64 [n], "L<i>": [n, d],
    "final": [n, d]}}`` for the requests
    whose ``SamplingParams.extra_args`` carried ``{"vlsi_key": key, "vlsi_rows": [positions]}``, rows sorted by
    position. Only tensor-parallel rank 0 stores anything (decoder outputs are replicated across TP ranks).
    """

    def vlsi_install_hooks(self, layers: list[int], capture_final: bool) -> int:
        from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank

        if get_pp_group().world_size != 1:
            raise RuntimeError("vlsi: pipeline parallelism is not supported by the vLLM backend (use tensor parallel)")
        for h in getattr(self, "_vlsi_handles", []):
            h.remove()
        self._vlsi_store: dict[str, dict[str, list]] = {}
        self._vlsi_positions: torch.Tensor | None = None
        self._vlsi_active = get_tensor_model_parallel_rank() == 0
        runner = self.model_runner
        decoder = _find_decoder(runner.get_model())
        n_layers = len(decoder.layers)
        bad = [i for i in layers if not 0 <= i < n_layers]
        if bad:
            raise RuntimeError(f"vlsi: layer ids {bad} out of range for a {n_layers}-layer teacher")
        handles = [decoder.register_forward_pre_hook(self._vlsi_pre_hook, with_kwargs=True)]
        for i in layers:
            handles.append(decoder.layers[i].register_forward_hook(self._vlsi_make_hook(f"L{i}", _residual_rows)))
        if capture_final:
            handles.append(decoder.norm.register_forward_hook(
                self._vlsi_make_hook("final", lambda out, rows: _first_tensor(out)[rows])))
        self._vlsi_handles = handles
        return n_layers

    def _vlsi_pre_hook(self, module, args, kwargs):
        pos = kwargs.get("positions", args[1] if len(args) > 1 else None)
        self._vlsi_positions = pos if isinstance(pos, torch.Tensor) else None

    def _vlsi_select(self, n_rows: int) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """(key, sequence positions, flat batch rows) of the wanted rows of each tagged request in this forward."""
        runner = self.model_runner
        batch = runner.input_batch
        n_req = batch.num_reqs
        qsl = runner.query_start_loc.np[: n_req + 1]
        pos_in = self._vlsi_positions
        out = []
        for r, rid in enumerate(batch.req_ids[:n_req]):
            state = runner.requests.get(rid)
            params = getattr(state, "sampling_params", None)
            extra = (params.extra_args or {}) if params is not None else {}
            if _KEY not in extra:
                continue
            a, b = int(qsl[r]), int(qsl[r + 1])
            if b > n_rows:
                raise RuntimeError(f"vlsi: batch layout mismatch ({b} rows expected, hook saw {n_rows})")
            start = int(batch.num_computed_tokens_cpu[r])
            seq_pos = torch.arange(start, start + (b - a), dtype=torch.long)
            if pos_in is not None and pos_in.dim() == 1:
                # Guard against vLLM internals drifting: our row -> position map must equal the model's positions.
                if not torch.equal(pos_in[a:b].to("cpu", torch.long), seq_pos):
                    raise RuntimeError(f"vlsi: row/position mapping mismatch for request {extra[_KEY]}")
            want = torch.as_tensor(extra[_ROWS], dtype=torch.long)
            keep = torch.isin(seq_pos, want)
            if bool(keep.any()):
                out.append((extra[_KEY], seq_pos[keep], torch.nonzero(keep).squeeze(1) + a))
        return out

    def _vlsi_make_hook(self, name: str, pick):
        def hook(module, args, output):
            if not self._vlsi_active:
                return
            for key, pos, rows in self._vlsi_select(_first_tensor(output).shape[0]):
                entry = self._vlsi_store.setdefault(key, {})
                entry.setdefault(name, []).append(pick(output, rows).detach().to("cpu", copy=True))
                entry.setdefault("pos_" + name, []).append(pos)
        return hook

    def vlsi_pop_captured(self) -> bytes:
        # Serialised here: vLLM's RPC encoder turns tensors nested in a utility's result into lists.
        import io

        buf = io.BytesIO()
        torch.save(self._vlsi_collect(), buf)
        return buf.getvalue()

    def _vlsi_collect(self) -> dict[str, dict[str, torch.Tensor]]:
        store, self._vlsi_store = self._vlsi_store, {}
        result: dict[str, dict[str, torch.Tensor]] = {}
        for key, entry in store.items():
            out: dict[str, torch.Tensor] = {}
            ref_pos = None
            for name in [n for n in entry if not n.startswith("pos_")]:
                pos = torch.cat(entry["pos_" + name])
                order = torch.argsort(pos)
                pos = pos[order]
                if ref_pos is None:
                    ref_pos = pos
                elif not torch.equal(pos, ref_pos):
                    raise RuntimeError(f"vlsi: layers captured different rows for request {key}")
                out[name] = torch.cat(entry[name])[order]
            out["pos"] = ref_pos if ref_pos is not None else torch.empty(0, dtype=torch.long)
            result[key] = out
        return result


def _first_tensor(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


# ---------------------------------------------------------------------------------------------------------------
# Driver side.
# ---------------------------------------------------------------------------------------------------------------


class VllmBackend(TeacherBackend):
    """A teacher served by vLLM (tensor parallel, paged attention, continuous batching) for extraction.

    Args:
        model_path: HF model directory (or anything ``vllm.LLM`` accepts).
        tensor_parallel_size: GPUs per model (vLLM's ``tensor_parallel_size``); pipeline parallel is not supported.
        dtype: ``"auto"`` | ``"bfloat16"`` | ``"float16"`` | ``"float32"`` (vLLM's ``dtype``).
        max_model_len: vLLM's ``max_model_len`` (default: the model's); ``input_ids`` may hold up to
            ``max_model_len - 1`` tokens (vLLM counts the one sampled token).
        top_k: k of the final head's record in ``"logprobs"`` mode (vLLM's ``max_logprobs``).
        final: ``"hidden"`` (return ``final_hidden``, the loop applies the head), ``"logprobs"`` (return
            ``final_topk`` from vLLM's prompt log-probs; needs an unpadded head), ``"auto"`` (logprobs when the head
            is not padded, else hidden).
        vocab_size: the real vocabulary (``len(tokenizer)``); default: read from the model's tokenizer.
        **engine_kwargs: passed to ``vllm.LLM`` (``gpu_memory_utilization``, ``kv_cache_memory_bytes``,
            ``max_num_batched_tokens``, ``seed``, ...). ``enforce_eager`` defaults to True: hooks do not run inside
            compiled / CUDA-graph-captured forwards.
    """

    name = "vllm"
    needs_images = False

    def __init__(
        self,
        model_path: str,
        *,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        max_model_len: int | None = None,
        top_k: int = 64,
        final: str = "auto",
        vocab_size: int | None = None,
        **engine_kwargs: Any,
    ) -> None:
        if final not in FINAL_MODES:
            raise VllmBackendError(f"vllm backend: final={final!r} must be one of {', '.join(FINAL_MODES)}")
        if top_k < 1:
            raise VllmBackendError(f"vllm backend: top_k={top_k} must be >= 1")
        _, LLM, self._SamplingParams, self._TokensPrompt = _import_vllm()
        engine_kwargs.setdefault("enforce_eager", True)
        if not engine_kwargs["enforce_eager"]:
            raise VllmBackendError("vllm backend: enforce_eager=False is not supported (hooks need eager forwards)")
        self.top_k = int(top_k)
        self.llm = LLM(
            model=str(model_path),
            tensor_parallel_size=tensor_parallel_size,
            dtype=dtype,
            max_model_len=max_model_len,
            max_logprobs=self.top_k,
            logprobs_mode="raw_logprobs",
            worker_extension_cls=EXTENSION_CLS,
            **engine_kwargs,
        )
        model_config = self.llm.llm_engine.model_config
        self.padded_vocab_size = int(model_config.get_vocab_size())
        self.vocab_size = int(vocab_size) if vocab_size is not None else len(self.llm.get_tokenizer())
        if not 1 <= self.vocab_size <= self.padded_vocab_size:
            raise VllmBackendError(
                f"vllm backend: vocab_size={self.vocab_size} must be in [1, head rows={self.padded_vocab_size}]")
        if final == "auto":
            final = "logprobs" if self.vocab_size == self.padded_vocab_size else "hidden"
        if final == "logprobs" and self.vocab_size != self.padded_vocab_size:
            raise VllmBackendError(
                f"vllm backend: final='logprobs' needs an unpadded head, but {model_path} has "
                f"{self.padded_vocab_size} head rows for a {self.vocab_size}-token vocabulary (vLLM's log-probs "
                "include the padded rows); use final='hidden'")
        self.final = final
        self.max_model_len = int(model_config.max_model_len)
        self.num_layers = int(model_config.get_num_layers(self.llm.llm_engine.vllm_config.parallel_config))
        self._hooked: tuple[int, ...] | None = None
        self._counter = itertools.count()

    # -- hooks ----------------------------------------------------------------------------------------------------

    def _ensure_hooks(self, layers: Sequence[int]) -> None:
        layers = tuple(sorted({int(i) for i in layers}))
        bad = [i for i in layers if not 0 <= i < self.num_layers]
        if bad:
            raise VllmBackendError(f"vllm backend: layer ids {bad} out of range for a {self.num_layers}-layer teacher")
        if self._hooked != layers:
            self.llm.collective_rpc("vlsi_install_hooks", args=(list(layers), self.final == "hidden"))
            self._hooked = layers

    # -- the contract ---------------------------------------------------------------------------------------------

    def _check(self, req: TeacherRequest) -> tuple[list[int], list[int]]:
        sid = req.sample_id
        if req.images or any(k in req.model_inputs for k in ("pixel_values", "image_grid_thw", "image_sizes")):
            raise VllmBackendError(f"vllm backend: sample {sid}: image inputs are not supported yet (text-only teachers)")
        ids = req.input_ids.reshape(-1).tolist()
        pos = req.answer_positions.reshape(-1).tolist()
        if len(ids) < 2:
            raise VllmBackendError(f"vllm backend: sample {sid}: input_ids has {len(ids)} tokens (need >= 2)")
        if len(ids) + 1 > self.max_model_len:  # vLLM counts the one sampled token against max_model_len
            raise VllmBackendError(
                f"vllm backend: sample {sid}: {len(ids)} tokens + 1 sampled > max_model_len={self.max_model_len}")
        if not pos or any(b <= a for a, b in zip(pos, pos[1:])) or pos[0] < 0 or pos[-1] >= len(ids) - 1:
            raise VllmBackendError(
                f"vllm backend: sample {sid}: answer_positions must be non-empty, strictly increasing, in [0, T - 1)")
        return ids, pos

    @torch.inference_mode()
    def run(self, requests: Sequence[TeacherRequest], layers: Sequence[int]) -> list[TeacherOutput]:
        """Teacher-forced prefill of each request's ``input_ids``; one output per request, same order.

        All requests go to vLLM at once (continuous batching packs them); rows come back keyed by request.
        """
        if not requests:
            return []
        layers = sorted({int(i) for i in layers})
        self._ensure_hooks(layers)
        checked = [self._check(r) for r in requests]
        keys = [f"{next(self._counter)}:{r.sample_id}" for r in requests]
        prompts, params = [], []
        for key, (ids, pos) in zip(keys, checked):
            prompts.append(self._TokensPrompt(prompt_token_ids=ids))
            params.append(self._SamplingParams(
                max_tokens=1,
                temperature=0.0,
                detokenize=False,
                prompt_logprobs=self.top_k if self.final == "logprobs" else None,
                flat_logprobs=True,
                skip_reading_prefix_cache=True,
                extra_args={_KEY: key, _ROWS: pos},
            ))
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        raw = self.llm.collective_rpc("vlsi_pop_captured")[0]  # TP rank 0 holds the rows
        captured = torch.load(io.BytesIO(raw), weights_only=True)
        results = []
        for req, key, (ids, pos), out in zip(requests, keys, checked, outs):
            got = captured.get(key)
            if got is None or got["pos"].tolist() != pos:
                n = 0 if got is None else got["pos"].numel()
                raise VllmBackendError(
                    f"vllm backend: sample {req.sample_id}: captured {n} of {len(pos)} answer rows "
                    "(prefix cache hit or an unsupported vLLM version)")
            if list(out.prompt_token_ids) != ids:
                raise VllmBackendError(f"vllm backend: sample {req.sample_id}: vLLM changed the prompt ids")
            layer_hidden = {i: got[f"L{i}"] for i in layers}
            if self.final == "hidden":
                results.append(TeacherOutput(req.sample_id, layer_hidden, final_hidden=got["final"]))
            else:
                topk = prompt_logprobs_topk(out.prompt_logprobs, pos, self.top_k, self.vocab_size, req.sample_id)
                results.append(TeacherOutput(req.sample_id, layer_hidden, final_topk=topk))
        return results

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            shutdown = getattr(llm.llm_engine, "shutdown", None) or getattr(llm.llm_engine.engine_core, "shutdown", None)
            if shutdown is not None:
                shutdown()


def prompt_logprobs_topk(prompt_logprobs: Any, rows: Sequence[int], k: int, vocab_size: int, sample_id: str):
    """vLLM ``FlatLogprobs`` prompt log-probs -> ``vlsi.ops.TopK`` at the answer rows.

    vLLM position ``p`` holds ``[prompt token, top-1, ..., top-k]`` for token ``p`` given ``ids[:p]``; row ``t``
    (predicting token ``t + 1``) is position ``t + 1``. The leading prompt-token entry is dropped; ranks must be
    ``1..k`` (checked), ids must lie in the real vocabulary (checked).
    """
    from vlsi.ops import TopK, tail_logmass

    if not hasattr(prompt_logprobs, "start_indices"):
        raise VllmBackendError(f"vllm backend: sample {sample_id}: expected flat prompt log-probs (vLLM >= 0.11)")
    starts, ends = prompt_logprobs.start_indices, prompt_logprobs.end_indices
    ids = torch.empty(len(rows), k, dtype=torch.int32)
    lps = torch.empty(len(rows), k, dtype=torch.float32)
    want_ranks = list(range(1, k + 1))
    for j, t in enumerate(rows):
        p = t + 1
        s, e = starts[p] + 1, ends[p]
        if e - s != k or list(prompt_logprobs.ranks[s:e]) != want_ranks:
            raise VllmBackendError(
                f"vllm backend: sample {sample_id}: row {t}: prompt log-probs have ranks "
                f"{list(prompt_logprobs.ranks[s:e])[:5]}..., expected 1..{k}")
        ids[j] = torch.tensor(prompt_logprobs.token_ids[s:e], dtype=torch.int32)
        lps[j] = torch.tensor(prompt_logprobs.logprobs[s:e], dtype=torch.float32)
    if ids.numel() and int(ids.max()) >= vocab_size:
        raise VllmBackendError(f"vllm backend: sample {sample_id}: top-k id {int(ids.max())} >= vocab_size={vocab_size}")
    return TopK(ids, lps, tail_logmass(lps))
