"""ssd op."""
