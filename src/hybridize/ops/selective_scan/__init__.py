"""selective_scan op."""
