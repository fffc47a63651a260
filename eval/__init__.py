"""vlsi.eval."""
