"""``python -m vlsi.train ...`` = ``vlsi-train ...`` (e.g. under ``torchrun --nproc-per-node N -m vlsi.train``)."""

from .cli import main

main()
