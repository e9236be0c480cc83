"""Protocol buffer definitions of semipd's gRPC API and their generated Python stubs.

Note: a package named `proto` also ships with proto-plus (a dependency of Ray's); from
the repository root ours wins. `cluster.grpc_client.load_stubs()` finds ours either way.
"""
