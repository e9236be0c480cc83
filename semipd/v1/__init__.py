"""semipd.v1: the Generation service (stubs of proto/semipd/v1/semipd.proto)."""
