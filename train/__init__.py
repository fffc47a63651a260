"""vlsi.train."""
