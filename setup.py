"""Packaging hook: the gRPC modules in alise/v1/ are generated from protos/ (never edited by hand, never
committed). `make protos` makes them for a checkout; here they are made when a wheel is built from a clean
one (`pip install .`), with grpcio-tools from the build requirements."""
import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def generated_up_to_date() -> bool:
    out = ROOT / "alise" / "v1" / "generate_pb2.py"
    return out.exists() and all(p.stat().st_mtime <= out.stat().st_mtime for p in (ROOT / "protos").rglob("*.proto"))


def generate_protos() -> None:
    if generated_up_to_date():
        return
    import grpc_tools
    from grpc_tools import protoc

    protos = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "protos").rglob("*.proto"))]
    include = str(Path(grpc_tools.__file__).parent / "_proto")          # google/protobuf/*.proto
    args = ["protoc", "-Iprotos", f"-I{include}", "--python_out=.", "--pyi_out=.", "--grpc_python_out=.", *protos]
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed on " + " ".join(protos))
    finally:
        os.chdir(cwd)
    (ROOT / "alise" / "v1" / "__init__.py").touch()


generate_protos()
setup()
