"""query_head."""
