#!/usr/bin/env python3
"""Regenerate csi/csi_pb2.py, its type stub csi/csi_pb2.pyi (for mypy) and csi/csi_pb2_grpc.py
from csi/csi.proto (needs grpcio-tools, which the test extra installs). ``--check`` only
reports whether the committed modules are up to date (tests/test_csi.py runs it)."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
CSI = ROOT / "csi"
OUTPUTS = ("csi_pb2.py", "csi_pb2.pyi", "csi_pb2_grpc.py")


def generate(out: Path) -> None:
    include = Path(protoc.__file__).parent / "_proto"  # the well-known types (wrappers.proto)
    code = protoc.main(["grpc_tools.protoc", f"-I{CSI}", f"-I{include}", f"--python_out={out}",
                        f"--pyi_out={out}", f"--grpc_python_out={out}", str(CSI / "csi.proto")])
    if code != 0:
        sys.exit(f"protoc failed with {code}")
    grpc_module = out / "csi_pb2_grpc.py"  # a package-relative import, so `csi` is importable as a package
    text = grpc_module.read_text().replace("import csi_pb2 as csi__pb2", "from . import csi_pb2 as csi__pb2")
    grpc_module.write_text(text)


def _essence(path: Path) -> list[str]:
    """The generated lines that depend on csi.proto (not on the generator's version)."""
    return [line for line in path.read_text().splitlines()
            if "Version" not in line and "_VERSION" not in line and not line.startswith("#")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed modules are stale")
    args = parser.parse_args()
    if not args.check:
        generate(CSI)
        return
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = [name for name in OUTPUTS if _essence(Path(tmp) / name) != _essence(CSI / name)]
    if stale:
        sys.exit(f"stale: {', '.join(stale)}; run scripts/gen_csi_proto.py")


if __name__ == "__main__":
    main()
