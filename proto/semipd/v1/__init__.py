"""semipd.v1: the Generation service (see semipd.proto)."""
