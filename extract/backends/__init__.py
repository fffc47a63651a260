"""vlsi.extract.backends."""
