"""Choosing between the torch path and the Triton kernels.

``impl="auto"`` picks Triton when it is importable and the tensors live on a CUDA device, torch otherwise (CPU,
no Triton, or Triton's interpreter, which is correct but slow). ``impl="torch"`` / ``impl="triton"`` force one;
the environment variable ``VLSI_OPS_IMPL`` (``torch``/``triton``) overrides ``"auto"`` process-wide, which is how
a user falls back to torch on a GPU without touching a config. Forcing Triton on CPU needs
``TRITON_INTERPRET=1`` set before triton is imported (the tests do this).
"""

from __future__ import annotations

import functools
import os

import torch

from vlsi.common.errors import VlsiError

IMPLS = ("auto", "torch", "triton")


class OpsError(VlsiError, ValueError):
    """An impossible ``impl`` choice (argument or ``VLSI_OPS_IMPL``): a user error every command prints as one line;
    still a ``ValueError`` for callers that catch that."""


@functools.lru_cache(maxsize=1)
def triton_importable() -> bool:
    """True when ``import triton`` works (cached: the import is slow and its outcome cannot change)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install raising at import time
        return False
    return True


def triton_interpreting() -> bool:
    """True when Triton runs its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_impl(impl: str, device: torch.device) -> str:
    """Return ``"torch"`` or ``"triton"`` for ``impl`` on ``device``; one-line :class:`OpsError` when impossible."""
    if impl not in IMPLS:
        raise OpsError(f"vlsi.ops: impl={impl!r} is not one of {IMPLS}")
    if impl == "auto":
        env = os.environ.get("VLSI_OPS_IMPL", "").strip().lower()
        if env in ("torch", "triton"):
            impl = env
        elif env:
            raise OpsError(f"vlsi.ops: environment VLSI_OPS_IMPL={env!r} is not 'torch' or 'triton'")
        else:
            return "triton" if (device.type == "cuda" and triton_importable()) else "torch"
    if impl == "triton":
        if not triton_importable():
            raise OpsError("vlsi.ops: impl='triton' but triton cannot be imported (pip install triton)")
        if device.type != "cuda" and not triton_interpreting():
            raise OpsError(
                f"vlsi.ops: impl='triton' on a {device.type} tensor needs a CUDA device or TRITON_INTERPRET=1"
            )
    return impl
