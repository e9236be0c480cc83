"""Regenerate the Python stubs of proto/semipd/v1/semipd.proto (run from anywhere).

    python proto/generate.py

Runs grpc_tools.protoc (grpcio-tools, a test dependency) with proto/ as the import root
and the repository root as the output root, so the stubs land in the package named after
the proto package: semipd/v1/semipd_pb2.py, semipd_pb2.pyi and semipd_pb2_grpc.py, which
import as `from semipd.v1 import semipd_pb2, semipd_pb2_grpc` (the gRPC stub's own
`from semipd.v1 import semipd_pb2` is protoc's, unchanged). The package's __init__.py
files are ours, not generated.

The generated files check their runtime: semipd_pb2 needs a protobuf runtime at least
as new as the gencode of the grpcio-tools that made it, semipd_pb2_grpc a grpcio at
least as new as that grpcio-tools; pyproject.toml's lower bounds follow them.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
OUT_ROOT = PROTO_ROOT.parent
PROTO_FILES = ("semipd/v1/semipd.proto",)


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
            f"--python_out={OUT_ROOT}",
            f"--pyi_out={OUT_ROOT}",
            f"--grpc_python_out={OUT_ROOT}",
            str(PROTO_ROOT / rel),
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed for {rel}")
        stem = OUT_ROOT / rel[: -len(".proto")]
        for package in (stem.parent, *stem.parent.parents):
            if package == OUT_ROOT:
                break
            if not (package / "__init__.py").exists():
                raise SystemExit(f"{package.relative_to(OUT_ROOT)}/__init__.py is missing (the stubs import as a package)")
        written += [stem.with_name(stem.name + s) for s in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")]
    return written


def main() -> int:
    for path in generate():
        print(f"wrote {path.relative_to(OUT_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
