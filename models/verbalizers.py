"""Verbalizers: per-target-layer modules that map a layer's hidden state into the space the model's own (frozen,
shared, never copied) final norm + LM head reads. Verbalizer logits at layer ``i``:
``lm_head(final_norm(verbalizer_i(h_i)))``.

Kinds (docs/method.md "Terms"; paper Table 4f). Every kind starts as the identity, so an untrained verbalizer is
the logit lens:

- ``verb-ffn`` (default): ``h + down(silu(gate(h)) * up(h))``, all three d x d, no bias, ``down`` zero-initialised.
- ``mlp``: ``h + W h``, one d x d linear, no bias, zero-initialised.
- ``ffn``: like ``verb-ffn`` but expanded to the model's intermediate size (d -> I -> d).
- ``decoder``: one decoder block of the model's own class (fresh init from the model's text config, normal
  std = ``initializer_range``; its attention ``o_proj`` and MLP ``down_proj`` zero-initialised so the block's two
  internal residuals make it the identity at init). It attends over the sample's whole sequence (causal, plain 1-D
  positions 0..T-1 with the model's rotary embedding; Qwen2-VL's M-RoPE gets the same 1-D positions on all three
  axes), so it needs every row of a sample, not only the answer rows (``needs_context``).

Files: ``verbalizers.safetensors`` (keys ``<layer>.<param>``) + ``verbalizers.json`` (format, kind, layers,
hidden/intermediate size, model fingerprint, ``weights_sha256`` = the verbalizer hash caches record).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from vlsi.models.errors import VlsiError

from .names import VERBALIZER_KINDS as KINDS

if TYPE_CHECKING:
    from vlsi.models.adapter import HiddenOut, ModelAdapter
    from vlsi.models.encoding import Batch

FORMAT = "vlsi.verbalizers"
FORMAT_VERSION = 1
WEIGHTS_FILE = "verbalizers.safetensors"
CONFIG_FILE = "verbalizers.json"
# Fingerprint fields that decide whether verbalizers fit a model (name/revision/processor may legitimately differ:
# the same weights loaded from a local dir or from the hub cache).
IDENTITY_FIELDS = ("family", "config_hash", "num_layers", "hidden_size", "vocab_size", "padded_vocab_size",
                   "tokenizer_hash")


class VerbalizerMismatchError(VlsiError):
    """Verbalizers trained for another model (fingerprint fields differ)."""


class GatedFFN(nn.Module):
    """``h + down(silu(gate(h)) * up(h))`` with ``down`` zero-initialised (identity at init)."""

    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate = nn.Linear(hidden, inner, bias=False)
        self.up = nn.Linear(hidden, inner, bias=False)
        self.down = nn.Linear(inner, hidden, bias=False)
        nn.init.zeros_(self.down.weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.down(nn.functional.silu(self.gate(h)) * self.up(h))


class ResidualLinear(nn.Module):
    """``h + W h`` with ``W`` zero-initialised."""

    def __init__(self, hidden: int):
        super().__init__()
        self.proj = nn.Linear(hidden, hidden, bias=False)
        nn.init.zeros_(self.proj.weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.proj(h)


class DecoderBlock(nn.Module):
    """One decoder layer of the model's class run causally over each sample's rows (see module doc)."""

    def __init__(self, layer_cls, text_config, family: str):
        super().__init__()
        self.block = layer_cls(text_config, 0)
        std = getattr(text_config, "initializer_range", 0.02)
        for name, p in self.block.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
        nn.init.zeros_(self.block.self_attn.o_proj.weight)
        nn.init.zeros_(self.block.mlp.down_proj.weight)
        self.mrope = family in ("qwen2_vl", "qwen2_5_vl")

    def forward(self, h: torch.Tensor, row_counts: Sequence[int], rotary: nn.Module) -> torch.Tensor:
        outs = []
        for seq in torch.split(h, list(row_counts)):
            T = seq.shape[0]
            x = seq[None]
            pos = torch.arange(T, device=h.device)[None]
            if self.mrope:
                pos = pos.expand(3, 1, T)
            cos_sin = tuple(t.to(h.device) for t in rotary(x, pos))  # the rotary may sit on another device
            mask = torch.full((T, T), float("-inf"), device=h.device, dtype=x.dtype).triu(1)[None, None]
            outs.append(self.block(x, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)[0])
        return torch.cat(outs) if outs else h


def _inner(kind: str, hidden: int, intermediate: int | None) -> int:
    if kind == "ffn":
        if not intermediate:
            raise ValueError("kind 'ffn' needs the model's intermediate size")
        return intermediate
    return hidden


class VerbalizerSet(nn.Module):
    """One verbalizer per target layer. ``forward(layer, h)`` -> h' (then the model's final norm + head).

    Build with ``VerbalizerSet.for_model(adapter, layers, kind=...)`` (needed for ``decoder``) or directly with
    sizes for the other kinds.
    """

    def __init__(self, layers: Sequence[int], hidden_size: int, *, kind: str = "verb-ffn",
                 intermediate_size: int | None = None, adapter: "ModelAdapter | None" = None):
        super().__init__()
        if kind not in KINDS:
            raise VlsiError(f"unknown verbalizer kind {kind!r}; supported: {', '.join(KINDS)}")
        layers = [int(i) for i in layers]
        if not layers or len(set(layers)) != len(layers) or layers != sorted(layers):
            raise VlsiError(f"verbalizer layers must be distinct and ascending, got {layers}")
        self.kind = kind
        self.layers = layers
        self.hidden_size = int(hidden_size)
        self.intermediate_size = int(intermediate_size) if intermediate_size else None
        self._rotary = None  # the model's rotary embedding (decoder kind); not a submodule: never saved
        mods = {}
        for i in layers:
            if kind in ("verb-ffn", "ffn"):
                mods[str(i)] = GatedFFN(self.hidden_size, _inner(kind, self.hidden_size, self.intermediate_size))
            elif kind == "mlp":
                mods[str(i)] = ResidualLinear(self.hidden_size)
            else:
                if adapter is None:
                    raise VlsiError("verbalizer kind 'decoder' needs the model (pass adapter=)")
                layer_cls = type(adapter.decoder_layers[0])
                mods[str(i)] = DecoderBlock(layer_cls, adapter.text_config, adapter.family)
        self.blocks = nn.ModuleDict(mods)
        if adapter is not None:
            self.bind(adapter)

    @classmethod
    def for_model(cls, adapter: "ModelAdapter", layers: Sequence[int], *, kind: str = "verb-ffn") -> "VerbalizerSet":
        for i in layers:
            if not 0 <= int(i) < adapter.num_layers - 1:
                raise VlsiError(f"target layer {i} out of range for {adapter.name}: 0..{adapter.num_layers - 2} "
                                f"(the final layer {adapter.num_layers - 1} has the model's own head)")
        vs = cls(layers, adapter.hidden_size, kind=kind, intermediate_size=adapter.intermediate_size, adapter=adapter)
        return vs.place(adapter)

    def place(self, adapter: "ModelAdapter") -> "VerbalizerSet":
        """Put each verbalizer on the device of its layer's output (``adapter.layer_device``): with a model spread
        over GPUs (``device_map``), verbalizer ``i`` runs where decoder layer ``i`` ran, its fp32 weights and Adam
        state live there, and only its [rows, d] output travels to the final norm + LM head's device. On one
        device this is ``.to(adapter.device)``. Dtypes are kept."""
        for i in self.layers:
            self.blocks[str(i)].to(device=adapter.layer_device(i))
        return self

    def device_of(self, layer: int) -> torch.device:
        """The device of verbalizer ``layer``'s weights."""
        for p in self.blocks[str(int(layer))].parameters():
            return p.device
        return torch.device("cpu")

    def bind(self, adapter: "ModelAdapter") -> "VerbalizerSet":
        """Attach the model's rotary embedding (decoder kind) without registering it as a submodule."""
        object.__setattr__(self, "_rotary", getattr(adapter.text_model, "rotary_emb", None))
        return self

    @property
    def needs_context(self) -> bool:
        """True when a verbalizer reads whole sequences (``decoder``), not single rows."""
        return self.kind == "decoder"

    def forward(self, layer: int, h: torch.Tensor, *, row_counts: Sequence[int] | None = None) -> torch.Tensor:
        """[N, d] -> [N, d]. For ``decoder``, ``h`` holds all rows of each sample and ``row_counts`` their counts."""
        block = self.blocks[str(int(layer))]
        if self.needs_context:
            if row_counts is None or self._rotary is None:
                raise VlsiError("decoder verbalizer needs row_counts and a bound model (VerbalizerSet.bind)")
            return block(h, row_counts, self._rotary)
        return block(h)

    def logits(self, layer: int, h: torch.Tensor, adapter: "ModelAdapter", **kw) -> torch.Tensor:
        """[N, vocab_size] verbalizer logits over the REAL vocab (materialised: small inputs / tests only)."""
        y = adapter.lm_head(adapter.final_norm(self.forward(layer, h, **kw)))
        return y[..., : adapter.vocab_size]

    # persistence ---------------------------------------------------------------------------------------------
    def config_dict(self, model_fingerprint: dict) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "layers": self.layers,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "model_fingerprint": model_fingerprint,
        }

    def save(self, out_dir: str | Path, model_fingerprint: dict) -> str:
        """Write weights + config to ``out_dir``; returns the weights' sha256 (the verbalizer hash)."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.blocks.state_dict().items()}
        tmp = out / (WEIGHTS_FILE + ".tmp")
        save_file(state, str(tmp), metadata={"format": FORMAT, "kind": self.kind})
        tmp.replace(out / WEIGHTS_FILE)
        digest = file_sha256(out / WEIGHTS_FILE)
        cfg = dict(self.config_dict(model_fingerprint), weights_sha256=digest)
        (out / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        return digest


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint_mismatch(saved: dict, expected: dict) -> list[str]:
    """Identity fields whose values differ (a field missing on one side counts as differing)."""
    return [k for k in IDENTITY_FIELDS if (k in saved or k in expected) and saved.get(k) != expected.get(k)]


def load_verbalizers(path: str | Path, *, expect_fingerprint: dict | None = None,
                     adapter: "ModelAdapter | None" = None) -> VerbalizerSet:
    """Load a saved set. Refuses (``VerbalizerMismatchError``) when ``expect_fingerprint`` (default: the
    ``adapter``'s, when given) differs in an identity field, and when the weights' hash differs from the record.
    ``decoder`` verbalizers need ``adapter``. The set is placed on the adapter's device when one is given.
    """
    from safetensors.torch import load_file

    d = Path(path)
    cfg_path = d / CONFIG_FILE
    if not cfg_path.is_file():
        raise VlsiError(f"{d}: no {CONFIG_FILE} (not a verbalizer directory)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise VlsiError(f"{cfg_path}: invalid JSON ({e})") from None
    if cfg.get("format") != FORMAT:
        raise VlsiError(f"{cfg_path}: format is {cfg.get('format')!r}, expected {FORMAT!r}")
    if int(cfg.get("format_version", -1)) > FORMAT_VERSION:
        raise VlsiError(f"{cfg_path}: format_version {cfg['format_version']} is newer than this vlsi "
                        f"({FORMAT_VERSION}); upgrade vlsi")
    if expect_fingerprint is None and adapter is not None:
        expect_fingerprint = adapter.fingerprint()
    if expect_fingerprint is not None:
        saved = cfg.get("model_fingerprint") or {}
        diff = fingerprint_mismatch(saved, expect_fingerprint)
        if diff:
            detail = ", ".join(f"{k}: {saved.get(k)!r} != {expect_fingerprint.get(k)!r}" for k in diff)
            raise VerbalizerMismatchError(f"{d}: verbalizers were trained for another model ({detail})")
    wpath = d / WEIGHTS_FILE
    if not wpath.is_file():
        raise VlsiError(f"{wpath}: missing weights file")
    digest = file_sha256(wpath)
    if cfg.get("weights_sha256") and digest != cfg["weights_sha256"]:
        raise VlsiError(f"{wpath}: sha256 {digest[:12]}... does not match {CONFIG_FILE} ({cfg['weights_sha256'][:12]}...)")
    vs = VerbalizerSet(cfg["layers"], cfg["hidden_size"], kind=cfg["kind"],
                       intermediate_size=cfg.get("intermediate_size"), adapter=adapter)
    state = load_file(str(wpath))
    missing, unexpected = vs.blocks.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise VlsiError(f"{wpath}: weights do not match {CONFIG_FILE} (missing {list(missing)[:3]}, "
                        f"unexpected {list(unexpected)[:3]})")
    vs.weights_sha256 = digest
    if adapter is not None:
        vs.place(adapter)
    return vs


def parameter_count(kind: str, hidden: int, n_layers: int, intermediate: int | None = None, *,
                    num_heads: int | None = None, num_kv_heads: int | None = None, qkv_bias: bool = True) -> int:
    """Trainable parameters of ``n_layers`` verbalizers of ``kind`` (decoder: a Qwen2/Llama-style block)."""
    d = hidden
    if kind == "verb-ffn":
        per = 3 * d * d
    elif kind == "mlp":
        per = d * d
    elif kind == "ffn":
        per = 3 * d * _inner("ffn", d, intermediate)
    elif kind == "decoder":
        if not (intermediate and num_heads and num_kv_heads):
            raise ValueError("decoder parameter count needs intermediate, num_heads and num_kv_heads")
        kv = d // num_heads * num_kv_heads
        attn = d * d + 2 * d * kv + d * d + ((d + 2 * kv) if qkv_bias else 0)
        per = attn + 3 * d * intermediate + 2 * d
    else:
        raise VlsiError(f"unknown verbalizer kind {kind!r}; supported: {', '.join(KINDS)}")
    return per * n_layers


def verbalized_states(vs: VerbalizerSet, adapter: "ModelAdapter", batch: "Batch", *,
                      backbone_grad: bool = False) -> tuple[dict, "HiddenOut"]:
    """Run the backbone on ``batch`` and the verbalizers on its answer rows.

    Returns ``({layer: final_norm(verbalizer(h_layer)) [A, d]}, hidden_out)`` where ``hidden_out.final_hidden``
    is the model's own final-normed state at the same rows (A rows, batch order); feed either to the frozen LM
    head. The backbone runs under ``no_grad`` unless ``backbone_grad`` (LoRA training); the verbalizers run in
    the caller's autograd mode.

    Devices (a model spread by a ``device_map``): verbalizer ``i`` runs on its own device (``VerbalizerSet.place``:
    its layer's), the final norm on its, and the returned states are on the LM head's device (autograd carries
    the gradient back across). Dtypes: without autocast the hidden state is cast to the verbalizer's dtype (a bf16
    model on CPU with fp32 verbalizer master weights); under autocast, autocast decides.
    """
    rows = "all" if vs.needs_context else "answer"
    with contextlib.nullcontext() if backbone_grad else torch.no_grad():
        hid = adapter.forward_hidden(batch, vs.layers, rows=rows)
    out = {}
    sel = _answer_rows_within_all(batch, hid) if vs.needs_context else None
    norm_dev, head_dev = _norm_device(adapter), _head_device(adapter)
    for i in vs.layers:
        h = _to_verbalizer(vs, i, hid.layer_hidden[i])
        y = vs(i, h, row_counts=hid.row_counts)[sel.to(h.device)] if vs.needs_context else vs(i, h)
        out[i] = adapter.final_norm(y.to(norm_dev)).to(head_dev)
    if vs.needs_context:
        hid.final_hidden = hid.final_hidden[sel.to(hid.final_hidden.device)]
        hid.positions = hid.positions[sel.to(hid.positions.device)]
        hid.row_counts = [int(p.numel()) for p in batch.answer_positions]
        hid.layer_hidden = {i: h[sel.to(h.device)] for i, h in hid.layer_hidden.items()}
    return out, hid


def _to_verbalizer(vs: VerbalizerSet, layer: int, h: torch.Tensor) -> torch.Tensor:
    """``h`` on verbalizer ``layer``'s device, and in its dtype unless autocast runs on that device."""
    p = next(vs.blocks[str(int(layer))].parameters(), None)
    if p is None:
        return h
    dtype = h.dtype if torch.is_autocast_enabled(p.device.type) else p.dtype
    return h.to(device=p.device, dtype=dtype)


def _norm_device(adapter) -> torch.device:
    dev = getattr(adapter, "norm_device", None)
    return dev if dev is not None else next(adapter.final_norm.parameters()).device


def _head_device(adapter) -> torch.device:
    return adapter.lm_head.weight.device


def _answer_rows_within_all(batch: "Batch", hid: "HiddenOut") -> torch.Tensor:
    # rows="all" lists positions 0..L_b-1 of each sample in order, so answer row t of sample b is offset_b + t.
    idx, off = [], 0
    for n, p in zip(hid.row_counts, batch.answer_positions):
        idx.append(p.long() + off)
        off += n
    return torch.cat(idx).to(hid.final_hidden.device)
