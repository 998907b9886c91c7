"""Regenerate the Python module of our ext_proc subset (proto/distillguard/envoy/v3/ext_proc.proto).

    python proto/generate_ext_proc.py              # writes server_plugins/envoy/_proto/ext_proc_pb2.py(i)
    python proto/generate_ext_proc.py --out DIR    # writes DIR/ext_proc_pb2.py(i) (the drift test compares)

Same pinned generator as proto/generate.py (grpcio-tools 1.81.1, for the same protobuf range) and the same
module-name rewrite. Only messages are generated: the server registers a generic handler under Envoy's
service name, so no _pb2_grpc module is needed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import GenerateError, check_grpcio_tools  # noqa: E402 - the sibling script's pin check

PROTO_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent
DEFAULT_OUT = REPO_ROOT / "server_plugins" / "envoy" / "_proto"
PROTO_FILE = "distillguard/envoy/v3/ext_proc.proto"
_STEM = "distillguard/envoy/v3/ext_proc_pb2"
_REWRITE = (
    "_builder.BuildTopDescriptorsAndMessages(DESCRIPTOR, 'distillguard.envoy.v3.ext_proc_pb2', _globals)\n",
    "_builder.BuildTopDescriptorsAndMessages(DESCRIPTOR, __name__, _globals)\n",
)
GENERATED_FILES = ("ext_proc_pb2.py", "ext_proc_pb2.pyi")


def generate(out: Path = DEFAULT_OUT) -> list[Path]:
    check_grpcio_tools()
    out = Path(out).resolve()
    with tempfile.TemporaryDirectory(prefix="distillguard-extproc-") as scratch:
        s = Path(scratch)
        cmd = [sys.executable, "-m", "grpc_tools.protoc", f"--proto_path={PROTO_ROOT}", f"--python_out={s}",
               f"--pyi_out={s}", PROTO_FILE]
        done = subprocess.run(cmd, cwd=PROTO_ROOT, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise GenerateError(f"protoc failed ({done.returncode}):\n{done.stderr.strip()}")
        py = s / f"{_STEM}.py"
        text = py.read_text(encoding="utf-8")
        if text.count(_REWRITE[0]) != 1:
            raise GenerateError(f"{py.name}: expected {_REWRITE[0].strip()!r} once; grpcio-tools' output changed")
        py.write_text(text.replace(*_REWRITE), encoding="utf-8")
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for name, src in zip(GENERATED_FILES, (py, s / f"{_STEM}.pyi"), strict=True):
            (out / name).write_bytes(src.read_bytes())
            written.append(out / name)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        written = generate(args.out)
    except GenerateError as exc:
        print(f"proto/generate_ext_proc.py: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
