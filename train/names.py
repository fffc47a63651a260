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
STAGES = ("verbalize", "interact", "sft")
"""Training stages, in their only valid order."""
