"""rglru op."""
