"""semipd's generated protocol buffer stubs, one subpackage per proto package.

The .proto sources live in proto/ (e.g. proto/semipd/v1/semipd.proto); `python proto/generate.py`
(or `make proto`) writes the stubs here, so they import as
`from semipd.v1 import semipd_pb2, semipd_pb2_grpc`.
"""
