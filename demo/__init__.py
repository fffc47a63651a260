"""vlsi.demo."""
