"""Build hooks: Cython extensions from native/ and gRPC code from proto/.

pyproject.toml holds the metadata; this file only adds what setuptools cannot
declare statically. Protobuf and gRPC modules are generated into
replicator/v1/ before the Python files are collected, so a fresh clone needs
no generated file committed and `pip install -e .` or a wheel build is enough.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTO_ROOT = ROOT / "proto"


def generate_protos() -> None:
    """Run protoc (from grpcio-tools) on every .proto under proto/ that changed."""
    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    if not protos:
        return
    outputs = [ROOT / p.relative_to(PROTO_ROOT).with_name(p.stem + "_pb2.py") for p in protos]
    newest_input = max(p.stat().st_mtime for p in protos)
    if all(o.exists() and o.stat().st_mtime >= newest_input for o in outputs):
        return
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={ROOT}",
        f"--pyi_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        *[str(p) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on " + ", ".join(str(p) for p in protos))


class BuildPy(build_py):
    def run(self) -> None:
        generate_protos()
        super().run()


class BuildExt(build_ext):
    def run(self) -> None:
        # Editable installs run build_ext but not build_py: generate here too.
        generate_protos()
        super().run()


def extensions() -> list[Extension]:
    from Cython.Build import cythonize

    common = dict(
        include_dirs=["native"],
        extra_compile_args=["-O3", "-fno-strict-aliasing"],
    )
    modules = [
        Extension("replicator._native.checksum", ["native/checksum.pyx"], **common),
    ]
    framing = ROOT / "native" / "framing.pyx"
    if framing.exists():
        modules.append(Extension("replicator._native.framing", [str(framing.relative_to(ROOT))], **common))
    return cythonize(
        modules,
        include_path=["native"],
        compiler_directives={
            "language_level": "3",
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "embedsignature": True,
        },
        quiet=True,
    )


setup(ext_modules=extensions(), cmdclass={"build_py": BuildPy, "build_ext": BuildExt})
