"""The teacher backend contract: one teacher-forced forward, hidden states at target layers for answer rows.

A backend knows how to run a teacher (transformers today, vLLM later) and nothing about verbalizers, top-k or the
cache. The extraction loop hands it a batch of encoded samples and gets back, for each sample's answer rows
(row ``t`` predicts token ``t + 1``), the decoder hidden states at the requested target layers and either the
final-normed hidden state (the loop applies the LM head) or, for backends that only expose log-probs, the final
head's top-k already computed.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch


@dataclass
class TeacherRequest:
    """One sample to run: the exact ids the cache will record, and the answer rows to return.

    ``model_inputs`` carries whatever else the model needs for this sample (``pixel_values``, ``image_grid_thw``, ...),
    as produced by the project's encoder; ``images`` are the PIL images for backends that run their own processor.
    """

    sample_id: str
    input_ids: torch.Tensor  # int64 [T]
    answer_positions: torch.Tensor  # int64 [A], strictly increasing, in [0, T - 1)
    model_inputs: dict[str, Any] = field(default_factory=dict)
    images: Sequence[Any] = ()


@dataclass
class TeacherOutput:
    """Per-sample result: rows follow ``answer_positions`` order.

    ``layer_hidden[i]`` is decoder layer ``i``'s output (before the final norm) at the answer rows, shape [A, d].
    Exactly one of ``final_hidden`` ([A, d], after the final norm, ready for the LM head) and ``final_topk``
    (a ``vlsi.ops.TopK`` over the real vocab) is set.
    """

    sample_id: str
    layer_hidden: dict[int, torch.Tensor]
    final_hidden: torch.Tensor | None = None
    final_topk: Any | None = None


class TeacherBackend(abc.ABC):
    """Runs the teacher; subclasses: ``TransformersBackend`` (hooks), ``VllmBackend``."""

    name: str = "abstract"

    @abc.abstractmethod
    def run(self, requests: Sequence[TeacherRequest], layers: Sequence[int]) -> list[TeacherOutput]:
        """Teacher-forced forward over each request's full ``input_ids``; one output per request, same order."""

    def close(self) -> None:
        """Release the model (GPU memory, worker processes)."""
