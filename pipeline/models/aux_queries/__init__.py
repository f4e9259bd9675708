"""aux_queries."""
