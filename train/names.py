"""The method's option names (docs/method.md "Step 2"), in a module without heavy imports so the CLI's ``--help``
stays instant."""

MATCH_RULES = ("multinomial", "argmin", "random", "uniform", "bottom-k")
"""Layer matching rules (vlsi.train.matching)."""
ADAPTIVE_TEMPS = ("scale-over-range", "range-over-scale", "off")
"""Adaptive temperature readings of Alg. 1's garbled line, plus off (T = 1)."""
LOSS_OPS = ("kld", "ce", "none")
"""Intermediate / last-layer loss ops of the interaction step (paper Table 4d)."""
DIRECTIONS = ("forward", "reverse")
"""KL directions: forward = KL(teacher || student), reverse = KL(student || teacher)."""
VLSI_STAGES = ("verbalize", "interact", "sft")
"""The VLsI method's stages (``--method vlsi``, the default), in their order."""
GENRECAL_STAGES = ("recalibrate", "joint", "sft")
"""GenRecal's stages (``--method genrecal``; docs/method.md "GenRecal"), in their order."""
STAGES = ("verbalize", "interact", "recalibrate", "joint", "sft")
"""Every training stage, in the order stages run (checkpoints sort by it); each method runs its own subset."""
METHODS = ("vlsi", "genrecal")
"""Distillation methods of vlsi-train: vlsi (one tokenizer, cached top-k) | genrecal (any tokenizers, cached
teacher hidden states + the teacher head)."""
METHOD_STAGES = {"vlsi": VLSI_STAGES, "genrecal": GENRECAL_STAGES}

