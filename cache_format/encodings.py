"""Value-encoding registry (SPEC section 6): how log-probs are stored and decoded."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .errors import SchemaError


@dataclass(frozen=True)
class ValueEncoding:
    """One way to store top-k log-probs. `encode`: float32 -> stored dtype; `decode`: stored -> float32."""

    name: str
    dtype: np.dtype
    encode: Callable[[np.ndarray], np.ndarray]
    decode: Callable[[np.ndarray], np.ndarray]


ENCODINGS: dict[str, ValueEncoding] = {}


def register_encoding(enc: ValueEncoding) -> None:
    if enc.name in ENCODINGS:
        raise ValueError(f"value encoding {enc.name!r} already registered")
    ENCODINGS[enc.name] = enc


def get_encoding(name: str) -> ValueEncoding:
    try:
        return ENCODINGS[name]
    except KeyError:
        raise SchemaError(f"unknown value_encoding {name!r} (known: {', '.join(sorted(ENCODINGS))})") from None


register_encoding(
    ValueEncoding(
        name="fp16-logprob",
        dtype=np.dtype("float16"),
        encode=lambda x: np.asarray(x, dtype=np.float32).astype(np.float16),
        decode=lambda x: np.asarray(x).astype(np.float32),
    )
)
