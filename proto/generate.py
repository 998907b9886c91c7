"""Regenerate the Python stubs of the distillguard gRPC API.

    python proto/generate.py              # writes defense/sidecar/_proto/distillguard/v1/
    python proto/generate.py --out DIR    # writes DIR/distillguard/v1/ (the tests compare it with the stubs)

This is the only way the files under defense/sidecar/_proto are made; never edit them by hand.

Pinned generator: grpcio-tools==1.81.1. Its bundled protoc stamps a protobuf "gencode" version (6.33.5) into
every _pb2 module, and the protobuf runtime refuses to load gencode newer than itself. 1.81.1 is the last
grpcio-tools whose stamp protobuf 6.33 accepts, which the Triton (tritonclient, protobuf<7) and Envoy
(xds-protos) environments resolve to; protobuf 7.x loads it too. So the stubs work with protobuf >=6.33.5,<8
everywhere. Another grpcio-tools would silently change that range: the script refuses to run with any other.

Import layout: the proto's own path (distillguard/v1/defense.proto) is kept as the descriptor's file name,
so reflection and other languages see the canonical name. protoc therefore writes code that expects a
top-level package `distillguard.v1`, which ours is not (it lives under defense.sidecar._proto). Rather than
put `_proto` on sys.path, two lines are rewritten after generation:

- defense_pb2_grpc.py: `from distillguard.v1 import defense_pb2` becomes `from . import defense_pb2`;
- defense_pb2.py: the module name handed to the protobuf builder becomes `__name__`, so message classes
  carry their real module (pickle and repr find them where they are).

Each rewrite must match exactly once; a protoc that emits something else stops the script.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

GRPCIO_TOOLS_VERSION = "1.81.1"

PROTO_ROOT = Path(__file__).resolve().parent  # the -I root: files are named relative to it
REPO_ROOT = PROTO_ROOT.parent
DEFAULT_OUT = REPO_ROOT / "defense" / "sidecar" / "_proto"
PROTO_FILES = ("distillguard/v1/defense.proto",)

# (generated file, line protoc writes, line we keep), relative to the output root.
_REWRITES = (
    (
        "distillguard/v1/defense_pb2_grpc.py",
        "from distillguard.v1 import defense_pb2 as distillguard_dot_v1_dot_defense__pb2\n",
        "from . import defense_pb2 as distillguard_dot_v1_dot_defense__pb2\n",
    ),
    (
        "distillguard/v1/defense_pb2.py",
        "_builder.BuildTopDescriptorsAndMessages(DESCRIPTOR, 'distillguard.v1.defense_pb2', _globals)\n",
        "_builder.BuildTopDescriptorsAndMessages(DESCRIPTOR, __name__, _globals)\n",
    ),
)

GENERATED_FILES = (
    "distillguard/v1/defense_pb2.py",
    "distillguard/v1/defense_pb2.pyi",
    "distillguard/v1/defense_pb2_grpc.py",
)


class GenerateError(RuntimeError):
    """The stubs could not be generated; the message says why and what to do."""


def check_grpcio_tools() -> None:
    try:
        found = metadata.version("grpcio-tools")
    except metadata.PackageNotFoundError:
        raise GenerateError(
            f"grpcio-tools is not installed; install the pinned generator with "
            f"`pip install grpcio-tools=={GRPCIO_TOOLS_VERSION}` (it is in the dev extra)"
        ) from None
    if found != GRPCIO_TOOLS_VERSION:
        raise GenerateError(
            f"grpcio-tools {GRPCIO_TOOLS_VERSION} is required, found {found}: another version stamps a "
            f"different protobuf gencode version into the stubs and changes the protobuf runtimes they "
            f"accept; run `pip install grpcio-tools=={GRPCIO_TOOLS_VERSION}`"
        )


def _run_protoc(out: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",  # adds the bundled well-known-type include path itself
        f"--proto_path={PROTO_ROOT}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *PROTO_FILES,
    ]
    done = subprocess.run(cmd, cwd=PROTO_ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise GenerateError(f"protoc failed ({done.returncode}):\n{done.stderr.strip()}")


def _rewrite(out: Path) -> None:
    for name, old, new in _REWRITES:
        path = out / name
        text = path.read_text(encoding="utf-8")
        count = text.count(old)
        if count != 1:
            raise GenerateError(
                f"{name}: expected the line {old.strip()!r} exactly once, found {count}; "
                f"grpcio-tools' output changed, update _REWRITES in proto/generate.py"
            )
        path.write_text(text.replace(old, new), encoding="utf-8")


def generate(out: Path = DEFAULT_OUT) -> list[Path]:
    """Generate the stubs into out/distillguard/v1/ and return the paths written.

    protoc writes into a scratch directory first, so a failure leaves `out` as it was. Missing
    __init__.py files of the distillguard/ and distillguard/v1/ packages are created empty.
    """
    check_grpcio_tools()
    out = Path(out).resolve()
    with tempfile.TemporaryDirectory(prefix="distillguard-proto-") as scratch:
        scratch_dir = Path(scratch)
        _run_protoc(scratch_dir)
        _rewrite(scratch_dir)
        written = []
        for name in GENERATED_FILES:
            target = out / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((scratch_dir / name).read_bytes())
            written.append(target)
    for package in (out / "distillguard", out / "distillguard" / "v1"):
        init = package / "__init__.py"
        if not init.exists():
            init.write_text("", encoding="utf-8")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="output root; files land in OUT/distillguard/v1/ (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    try:
        written = generate(args.out)
    except GenerateError as exc:
        print(f"proto/generate.py: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
