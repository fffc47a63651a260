"""The vLLM teacher backend: teacher-forced prefill under vLLM, hidden states from hooks inside the vLLM workers.

How it works (vLLM >= 0.32 V1 engine; see docs/vllm.md for what was verified and on which version):

- Each request is a ``TokensPrompt`` of the exact ids the cache records, with ``max_tokens=1`` (the one sampled
  token is thrown away) and ``skip_reading_prefix_cache=True``: a prefix-cache hit would skip the forward of the
  cached positions, and their hidden states would never pass our hooks.
- Vision-language teachers (Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision): the prompt is the project's ids with each
  image's run of image tokens collapsed back to ONE placeholder, plus the PIL images as ``multi_modal_data``; vLLM
  runs the image processor and expands each placeholder itself (feeding the expanded ids would make it expand them
  again). The expanded ``prompt_token_ids`` vLLM reports must equal the project's encoding (the ids the cache
  stores); any difference is refused naming the sample and the first differing position. Both sides read the
  image-processor settings from the teacher's ``preprocessor_config.json`` (``mm_processor_kwargs`` is refused;
  the settings vLLM loaded are compared with the project's at start-up).
- ``worker_extension_cls`` mixes :class:`VllmHiddenStateExtension` into every vLLM worker; ``collective_rpc`` calls
  its methods by name (no pickled callables, so it works with the default multiprocess engine and with tensor
  parallelism). Its forward hooks on the decoder layers (and the final norm) keep only the rows of the answer
  positions that travel with each request in ``SamplingParams.extra_args``. Continuous batching packs several
  requests into one flat token batch: the hook maps rows back to requests through the runner's ``query_start_loc``
  and each request's ``num_computed_tokens`` (chunked prefill included), and checks that mapping against the
  ``positions`` the model was called with: ``[N]`` for RoPE (position = sequence index), ``[3, N]`` for M-RoPE
  (Qwen2-VL's (t, h, w) positions, which are not sequence indices after an image: compared with the runner's
  per-request ``mrope_positions`` at the mapped sequence indices).
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
transformers); constructing :class:`VllmBackend` without vLLM raises :class:`VllmNotInstalledError`. Without
torchvision, VLM teachers need the project's vLLM plugin (``vllm_plugin``, entry point ``vllm.general_plugins``).

Test-only fault injection (``VLSI_VLLM_FAULT``, read at each use, in the driver and in the workers): ``row_shift``
(answer rows taken one position early, after the mapping check), ``positions`` (the row -> position map off by
one, before the check), ``double_expand`` (the already-expanded ids sent with the images), ``double_expand_unchecked``
(the same without the expanded-ids check). The tests use them to show that the comparisons catch these bugs.
"""

from __future__ import annotations

import io
import itertools
import os
from typing import Any, Sequence

import torch

from vlsi.extract.backends.base import TeacherBackend, TeacherOutput, TeacherRequest

__all__ = ["VllmBackend", "VllmHiddenStateExtension", "VllmNotInstalledError", "vllm_available", "FINAL_MODES"]

FINAL_MODES = ("auto", "hidden", "logprobs")
EXTENSION_CLS = "vlsi.extract.backends.vllm_backend.VllmHiddenStateExtension"
_KEY = "vlsi_key"
_ROWS = "vlsi_rows"
FAULTS = ("row_shift", "positions", "double_expand", "double_expand_unchecked")


def _fault() -> str:
    """The test-only fault to inject (module docstring); "" in normal runs."""
    return os.environ.get("VLSI_VLLM_FAULT", "")


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


def _check_positions(pos_in: torch.Tensor | None, a: int, b: int, seq_pos: torch.Tensor, state: Any,
                     key: str) -> None:
    """The positions the model got for flat rows ``a:b`` must be those of sequence indices ``seq_pos``.

    RoPE: ``positions`` is ``[N]`` and equals the sequence index. M-RoPE (Qwen2-VL / Qwen2.5-VL): ``positions`` is
    ``[3, N]`` (temporal, height, width); inside and after an image they are not sequence indices, so the expected
    values are the runner's per-request table ``mrope_positions[:, seq_pos]`` (the prompt part, computed by vLLM
    from the image grids) and ``seq_pos + mrope_position_delta`` beyond the prompt.
    """
    if pos_in is None:
        raise RuntimeError(f"vlsi: the decoder was called without a positions tensor (request {key})")
    got = pos_in[..., a:b].to("cpu", torch.long)
    if pos_in.dim() == 1:
        want = seq_pos
    elif pos_in.dim() == 2 and getattr(state, "mrope_positions", None) is not None:
        table = state.mrope_positions.to("cpu", torch.long)
        n_prompt = table.shape[-1]
        want = torch.empty((table.shape[0], seq_pos.numel()), dtype=torch.long)
        inside = seq_pos < n_prompt
        want[:, inside] = table[:, seq_pos[inside]]
        if not bool(inside.all()):
            want[:, ~inside] = seq_pos[~inside] + int(state.mrope_position_delta or 0)
    else:
        raise RuntimeError(f"vlsi: unsupported positions layout {tuple(pos_in.shape)} (request {key})")
    if got.shape != want.shape or not torch.equal(got, want):
        raise RuntimeError(f"vlsi: row/position mapping mismatch for request {key}")


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
        # The positions come from a pre-hook on the FIRST decoder layer, not on the decoder: vLLM's
        # @support_torch_compile replaces the decoder's __call__ and calls forward() directly (even in eager mode),
        # so the decoder's own hooks never run; the layers are plain modules called as layer(positions, h, res).
        handles = [decoder.layers[0].register_forward_pre_hook(self._vlsi_pre_hook, with_kwargs=True)]
        for i in layers:
            handles.append(decoder.layers[i].register_forward_hook(self._vlsi_make_hook(f"L{i}", _residual_rows)))
        if capture_final:
            handles.append(decoder.norm.register_forward_hook(
                self._vlsi_make_hook("final", lambda out, rows: _first_tensor(out)[rows])))
        self._vlsi_handles = handles
        return n_layers

    def _vlsi_pre_hook(self, module, args, kwargs):
        pos = kwargs.get("positions", args[0] if args else None)
        self._vlsi_positions = pos if isinstance(pos, torch.Tensor) else None

    def _vlsi_select(self, n_rows: int) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """(key, sequence positions, flat batch rows) of the wanted rows of each tagged request in this forward."""
        runner = self.model_runner
        batch = runner.input_batch
        n_req = batch.num_reqs
        qsl = runner.query_start_loc.np[: n_req + 1]
        pos_in = self._vlsi_positions
        fault = _fault()
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
            start = int(batch.num_computed_tokens_cpu[r]) + (1 if fault == "positions" else 0)
            seq_pos = torch.arange(start, start + (b - a), dtype=torch.long)
            # Guard against vLLM internals drifting: our row -> position map must give the model's positions.
            _check_positions(pos_in, a, b, seq_pos, state, extra[_KEY])
            if fault == "row_shift":
                seq_pos = seq_pos + 1  # (test only) each row labelled with the next position: an off-by-one
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
        image_token_id: VLM teachers: the placeholder token of one image (the project's encoding expands it to the
            image's token count; vLLM gets one per image). Default: the model config's.
        image_processor: VLM teachers: the project's image processor (``ProcessorBundle.image_processor``); the
            settings vLLM loaded must equal its (:data:`IMAGE_SETTING_KEYS`), checked at start-up.
        **engine_kwargs: passed to ``vllm.LLM`` (``gpu_memory_utilization``, ``kv_cache_memory_bytes``,
            ``max_num_batched_tokens``, ``limit_mm_per_prompt``, ``seed``, ...). ``enforce_eager`` defaults to
            True: hooks do not run inside compiled / CUDA-graph-captured forwards. ``mm_processor_kwargs`` is
            refused: image settings come from the teacher's ``preprocessor_config.json`` on both sides.
    """

    name = "vllm"
    needs_images = False  # True for a vision-language teacher: the loop then hands over the PIL images

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
        image_token_id: int | None = None,
        image_processor: Any = None,
        **engine_kwargs: Any,
    ) -> None:
        if final not in FINAL_MODES:
            raise VllmBackendError(f"vllm backend: final={final!r} must be one of {', '.join(FINAL_MODES)}")
        if top_k < 1:
            raise VllmBackendError(f"vllm backend: top_k={top_k} must be >= 1")
        if "mm_processor_kwargs" in engine_kwargs:
            raise VllmBackendError(
                "vllm backend: mm_processor_kwargs is not supported: the image processor settings (min/max pixels) "
                "come from the teacher's preprocessor_config.json, which the project's encoder and the cache "
                "fingerprint read too; change them there")
        _, LLM, self._SamplingParams, self._TokensPrompt = _import_vllm()
        _check_plugin(model_path)
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
        self.model_type = str(getattr(model_config.hf_config, "model_type", ""))
        self.is_multimodal = bool(getattr(model_config, "is_multimodal_model", False))
        self.needs_images = self.is_multimodal
        self.image_token_id: int | None = None
        self.max_images = 0
        if self.is_multimodal:
            hf = model_config.hf_config
            cfg_id = getattr(hf, "image_token_id", None)
            if cfg_id is None:
                cfg_id = getattr(hf, "image_token_index", None)
            self.image_token_id = int(image_token_id if image_token_id is not None else cfg_id)
            self.max_images = int(model_config.multimodal_config.get_limit_per_prompt("image"))
            if image_processor is not None:
                try:
                    self._check_image_processor(image_processor)
                except BaseException:
                    self.close()
                    raise
        self._hooked: tuple[int, ...] | None = None
        self._counter = itertools.count()

    def _check_image_processor(self, ours: Any) -> None:
        """The image processor vLLM loaded must be configured as the project's (same class, same settings)."""
        from vllm.multimodal import MULTIMODAL_REGISTRY

        theirs = MULTIMODAL_REGISTRY.create_processor(self.llm.llm_engine.model_config).info.get_hf_processor()
        theirs = theirs.image_processor
        a, b = image_settings(ours), image_settings(theirs)
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if diff:
            k = diff[0]
            raise VllmBackendError(
                f"vllm backend: vLLM's image processor differs from the project's in {', '.join(diff)} "
                f"({k}: vLLM {b.get(k)!r}, project {a.get(k)!r}); both must load the teacher's "
                "preprocessor_config.json the same way")

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
        n_img = len(req.images)
        if not self.is_multimodal and (n_img or any(k in req.model_inputs for k in ("pixel_values", "image_grid_thw",
                                                                                    "image_sizes"))):
            raise VllmBackendError(f"vllm backend: sample {sid}: image inputs for a text-only teacher")
        if self.is_multimodal and not n_img and "pixel_values" in req.model_inputs:
            raise VllmBackendError(f"vllm backend: sample {sid}: image tensors without the images (the vLLM "
                                   "backend runs vLLM's own image processor on the PIL images)")
        if n_img > 1 and self.model_type == "llava_onevision":
            # transformers (the project's encoding, the student) switches LLaVA-OV to its multi-image path (base
            # resolution, no anyres) for a sample with several images; vLLM (0.32) processes every image with anyres
            raise VllmBackendError(
                f"vllm backend: sample {sid}: {n_img} images: vLLM processes each LLaVA-OneVision image with anyres, "
                "transformers uses the multi-image path (other image tokens); use --backend transformers for "
                "multi-image LLaVA-OneVision samples")
        if n_img > self.max_images:
            raise VllmBackendError(
                f"vllm backend: sample {sid}: {n_img} images > vLLM's limit of {self.max_images} per prompt "
                "(raise it: --backend-option limit_mm_per_prompt.image=N)")
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

    def _prompt(self, req: TeacherRequest, ids: list[int]):
        """vLLM's input for one sample: the ids, or (VLM) one placeholder per image + the images."""
        if not req.images:
            return self._TokensPrompt(prompt_token_ids=ids)
        if _fault() in ("double_expand", "double_expand_unchecked"):
            prompt_ids = ids  # (test only) the already-expanded ids: vLLM expands every image again
        else:
            prompt_ids = collapse_image_tokens(ids, self.image_token_id, len(req.images), req.sample_id)
        return self._TokensPrompt(prompt_token_ids=prompt_ids, multi_modal_data={"image": list(req.images)})

    def _generate(self, requests, prompts, params):
        try:
            return self.llm.generate(prompts, params, use_tqdm=False)
        except Exception as exc:  # noqa: BLE001 - vLLM rejects an input with many types (AssertionError, ValueError)
            # An input vLLM's renderer / multimodal processor rejects aborts the whole call (vLLM aborts the requests
            # already added: nothing stays queued) without naming it. Render each prompt alone (no forward) to find
            # it; anything else (an engine failure) is re-raised as it is.
            culprit = None
            render = getattr(self.llm, "_preprocess_cmpl_one", None)  # vLLM 0.32's per-prompt renderer
            for req, prompt in zip(requests, prompts):
                if render is None:
                    break
                try:
                    render(prompt)
                except Exception as probe:  # noqa: BLE001
                    culprit, exc = req.sample_id, probe
                    break
            if culprit is None:
                raise
            msg = str(exc).strip().splitlines()
            raise VllmBackendError(f"vllm backend: sample {culprit}: vLLM rejected the request "
                                   f"({type(exc).__name__}: {msg[0] if msg else ''})") from exc

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
        for req, key, (ids, pos) in zip(requests, keys, checked):
            prompts.append(self._prompt(req, ids))
            params.append(self._SamplingParams(
                max_tokens=1,
                temperature=0.0,
                detokenize=False,
                prompt_logprobs=self.top_k if self.final == "logprobs" else None,
                flat_logprobs=True,
                skip_reading_prefix_cache=True,
                extra_args={_KEY: key, _ROWS: pos},
            ))
        outs = self._generate(requests, prompts, params)
        if len(outs) != len(prompts):  # e.g. requests left in the engine by an earlier failed call
            raise VllmBackendError(f"vllm backend: vLLM returned {len(outs)} outputs for {len(prompts)} requests")
        raw = self.llm.collective_rpc("vlsi_pop_captured")[0]  # TP rank 0 holds the rows
        captured = torch.load(io.BytesIO(raw), weights_only=True)
        results = []
        for req, key, (ids, pos), out in zip(requests, keys, checked, outs):
            # The cache stores the project's ids and the student's join depends on them: vLLM must have run exactly
            # these (for VLMs: after expanding each image placeholder itself).
            if _fault() != "double_expand_unchecked":
                check_same_ids(list(out.prompt_token_ids), ids, req.sample_id, images=bool(req.images))
            got = captured.get(key)
            if got is None or got["pos"].tolist() != pos:
                n = 0 if got is None else got["pos"].numel()
                raise VllmBackendError(
                    f"vllm backend: sample {req.sample_id}: captured {n} of {len(pos)} answer rows "
                    "(prefix cache hit or an unsupported vLLM version)")
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


# Image-processor settings both sides must share: what changes the token count (the fingerprint's
# ``processor_settings``) and what changes the pixel values; plus the class (PIL vs torchvision backend).
IMAGE_SETTING_KEYS = (
    "min_pixels", "max_pixels", "size", "patch_size", "merge_size", "temporal_patch_size", "image_grid_pinpoints",
    "crop_size", "do_pad", "do_resize", "resample", "do_rescale", "rescale_factor", "do_normalize", "image_mean",
    "image_std", "do_convert_rgb",
)


def image_settings(image_processor: Any) -> dict:
    """The :data:`IMAGE_SETTING_KEYS` of an HF image processor (JSON-normalised) and its class name."""
    import json

    d = image_processor.to_dict()
    out = {k: d.get(k) for k in IMAGE_SETTING_KEYS}
    out["class"] = type(image_processor).__name__.removesuffix("ImagesOnly")
    return json.loads(json.dumps(out, default=str))


def collapse_image_tokens(ids: Sequence[int], image_token_id: int, n_images: int, sample_id: str) -> list[int]:
    """The project's ids (each image expanded to its token count) -> one placeholder per image, as vLLM expects.

    Each maximal run of ``image_token_id`` is one image (every supported chat template puts text or a vision
    start/end token between two images); the number of runs must equal ``n_images``.
    """
    out: list[int] = []
    runs = 0
    prev = None
    for t in ids:
        if t == image_token_id:
            if prev != image_token_id:
                out.append(t)
                runs += 1
        else:
            out.append(t)
        prev = t
    if runs != n_images:
        raise VllmBackendError(f"vllm backend: sample {sample_id}: {runs} runs of image tokens for {n_images} "
                               "image(s) (adjacent images cannot be told apart)")
    return out


def check_same_ids(vllm_ids: Sequence[int], ids: Sequence[int], sample_id: str, *, images: bool = True) -> None:
    """Refuse (one line: sample, first differing position) when vLLM's prompt is not the project's encoding."""
    if list(vllm_ids) == list(ids):
        return
    n = min(len(vllm_ids), len(ids))
    p = next((i for i in range(n) if vllm_ids[i] != ids[i]), n)
    got = vllm_ids[p] if p < len(vllm_ids) else "end"
    want = ids[p] if p < len(ids) else "end"
    hint = (": image placeholders expanded differently (processor settings, or ids already expanded)" if images
            else "")
    raise VllmBackendError(
        f"vllm backend: sample {sample_id}: vLLM's prompt differs from the project's encoding at position {p} "
        f"(vLLM {got}, project {want}; {len(vllm_ids)} vs {len(ids)} tokens){hint}")


def _check_plugin(model_path: str) -> None:
    """A VLM teacher without torchvision needs this project's vLLM plugin (an entry point: the installed metadata
    must be current). Refuse before vLLM starts, with the fix, instead of vLLM's opaque inspection error."""
    import json
    from importlib.metadata import entry_points
    from pathlib import Path

    from vlsi.extract.backends import vllm_plugin

    cfg = Path(model_path) / "config.json"
    try:
        archs = json.loads(cfg.read_text()).get("architectures") or []
    except (OSError, ValueError):
        return
    if not set(archs) & set(vllm_plugin.ARCHITECTURES) or not vllm_plugin.needed():
        return
    names = {ep.value for ep in entry_points(group="vllm.general_plugins")}
    if "vlsi.extract.backends.vllm_plugin:register" not in names:
        raise VllmBackendError(
            f"vllm backend: {archs[0]} without torchvision needs the project's vLLM plugin, which this environment's "
            "vlsi install does not declare: reinstall it (pip install --no-deps -e <repo>, or scripts/vllm_env.sh)")


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
