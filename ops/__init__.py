"""vlsi.ops."""
