"""vlsi.models."""
