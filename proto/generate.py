"""Regenerate the Python stubs of proto/semipd/v1/semipd.proto (run from anywhere).

    python proto/generate.py

Writes semipd_pb2.py, semipd_pb2.pyi and semipd_pb2_grpc.py next to the .proto file
with grpc_tools.protoc (grpcio-tools, a test dependency), then makes the import of
semipd_pb2 in the gRPC stub relative, so that the stubs import as
`from proto.semipd.v1 import semipd_pb2, semipd_pb2_grpc` (protoc writes
`from semipd.v1 import ...`, which only works with proto/ itself on sys.path).

The generated files check their runtime: semipd_pb2 needs a protobuf runtime at least
as new as the gencode of the grpcio-tools that made it, semipd_pb2_grpc a grpcio at
least as new as that grpcio-tools; pyproject.toml's lower bounds follow them.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_FILES = ("semipd/v1/semipd.proto",)


def _fix_imports(grpc_stub: Path) -> None:
    """`from semipd.v1 import semipd_pb2 as ...` -> `from . import semipd_pb2 as ...`."""
    text = grpc_stub.read_text()
    fixed = re.sub(r"^from semipd\.v1 import (\w+_pb2) as", r"from . import \1 as", text, flags=re.M)
    grpc_stub.write_text(fixed)


def generate() -> list[Path]:
    """Run protoc for every file of PROTO_FILES; return the files written."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    written: list[Path] = []
    for rel in PROTO_FILES:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={PROTO_ROOT}",
            f"--pyi_out={PROTO_ROOT}",
            f"--grpc_python_out={PROTO_ROOT}",
            str(PROTO_ROOT / rel),
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed for {rel}")
        stem = PROTO_ROOT / rel[: -len(".proto")]
        grpc_stub = stem.with_name(stem.name + "_pb2_grpc.py")
        _fix_imports(grpc_stub)
        written += [stem.with_name(stem.name + s) for s in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")]
    return written


def main() -> int:
    for path in generate():
        print(f"wrote {path.relative_to(PROTO_ROOT.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
