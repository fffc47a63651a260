"""vlsi.cache_format."""
