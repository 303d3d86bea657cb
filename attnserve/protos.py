"""Generates the Python gRPC stubs in attnserve/v1/ from protos/ with grpcio-tools.

    python -m attnserve.protos            # regenerate in place
    python -m attnserve.protos --check    # exit 1 when the committed stubs are stale

The stubs are committed so that a serving install needs no protoc; the pinned grpcio-tools in the
dev extra makes regeneration byte-for-byte reproducible, which is what the staleness check
(tests/test_protos.py) relies on.
"""

from __future__ import annotations

import argparse
import filecmp
import logging
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PROTOS = sorted(p.relative_to(PROTO_ROOT) for p in PROTO_ROOT.rglob("*.proto"))
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")

log = logging.getLogger(__name__)


def generate(out_dir: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) on every .proto; returns the generated files."""
    from grpc_tools import protoc  # dev dependency only: a serving install never regenerates

    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", *map(str, PROTOS)]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTOS}")
    return [out_dir / proto.with_suffix("").with_name(proto.stem + suffix) for proto in PROTOS for suffix in GENERATED_SUFFIXES]


def stale_files() -> list[str]:
    """Generated files that differ from (or are missing in, or are extra in) the tree."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.relative_to(tmp) for p in generate(Path(tmp))}
        committed = {p.relative_to(ROOT) for p in (ROOT / "attnserve").rglob("*") if p.name.endswith(GENERATED_SUFFIXES)}
        return sorted(str(p) for p in fresh | committed
                      if p not in fresh or p not in committed or not filecmp.cmp(Path(tmp) / p, ROOT / p, shallow=False))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report stale stubs (exit 1 if any)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.check:
        stale = stale_files()
        for name in stale:
            log.error("stale generated stub: %s (run python -m attnserve.protos)", name)
        return 1 if stale else 0
    for path in generate(ROOT):
        log.info("generated %s", path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
