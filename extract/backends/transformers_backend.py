"""The transformers teacher backend: one teacher-forced forward of the base model, hooks at the target layers.

It delegates to ``ModelAdapter.forward_hidden`` (hooks gather only the answer rows, the LM head is never run over
all positions) and adds nothing but batching glue, so what the cache records is what every other project
component (verbalization, training) sees from the same model. ``device_map="auto"`` is the adapter's business
(accelerate dispatch); hidden states then come back on whichever GPU holds their layer.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from vlsi.extract.backends.base import TeacherBackend, TeacherOutput, TeacherRequest


def _num_images(model_inputs: dict) -> int:
    for key in ("image_grid_thw", "image_sizes"):
        if key in model_inputs:
            return int(model_inputs[key].shape[0])
    return 0


def request_to_encoded(req: TeacherRequest):
    """A ``vlsi.models.encoding.Encoded`` for ``req`` (the answer mask is rebuilt from the answer positions)."""
    from vlsi.models.encoding import Encoded

    ids = req.input_ids.long()
    pos = req.answer_positions.long()
    mask = torch.zeros(ids.shape[0], dtype=torch.bool)
    mask[pos + 1] = True  # row t predicts token t + 1: answer_mask[t + 1] <=> t is an answer position
    return Encoded(req.sample_id, "", ids, mask, dict(req.model_inputs), pos, _num_images(req.model_inputs))


class TransformersBackend(TeacherBackend):
    """Run a ``vlsi.models.ModelAdapter`` (already loaded: dtype, device or device_map chosen by the caller)."""

    name = "transformers"
    needs_images = False  # model inputs come from the project's own encoder; PIL images are not needed

    def __init__(self, adapter: Any) -> None:
        from vlsi.models.encoding import pad_id_of

        self.adapter = adapter
        self.pad_id = pad_id_of(adapter.tokenizer)

    @torch.inference_mode()
    def run(self, requests: Sequence[TeacherRequest], layers: Sequence[int]) -> list[TeacherOutput]:
        from vlsi.models.encoding import collate

        if not requests:
            return []
        batch = collate([request_to_encoded(r) for r in requests], self.pad_id)
        out = self.adapter.forward_hidden(batch, layers, rows="answer")
        counts = list(out.row_counts)
        split_layers = {i: torch.split(h, counts) for i, h in out.layer_hidden.items()}
        finals = torch.split(out.final_hidden, counts)
        return [
            TeacherOutput(r.sample_id, {i: split_layers[i][b] for i in split_layers}, final_hidden=finals[b])
            for b, r in enumerate(requests)
        ]

    def close(self) -> None:
        self.adapter = None
