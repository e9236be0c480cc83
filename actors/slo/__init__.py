"""SLO-aware SM partitioning: what each GPU's split should be, given its load and latency."""
