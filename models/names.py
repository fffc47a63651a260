"""Vocabularies of vlsi.models in a module without heavy imports, so CLIs can offer them with an instant --help."""

VERBALIZER_KINDS = ("verb-ffn", "mlp", "ffn", "decoder")
"""Verbalizer architectures (vlsi.models.verbalizers): verb-ffn is the paper's; the others are its ablations."""
REC_NORMS = ("layernorm", "rmsnorm")
"""The GenRecal Recalibrator's output norm (vlsi.models.recalibrator): layernorm (paper) | rmsnorm."""
REC_INITS = ("random", "identity")
"""The Recalibrator's initialisation: random (default) | identity (teacher-only input reproduces the teacher)."""
