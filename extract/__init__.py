"""vlsi.extract."""
