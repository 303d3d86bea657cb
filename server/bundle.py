"""Model bundles: a directory with ONNX graphs, a SentencePiece model and manifest.json.

Loading verifies the sha256 of every file the manifest names before anything is used, so a
truncated copy, a tampered graph or a missing tokenizer is refused with a clear error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "attnserve-bundle"
BUNDLE_FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class BundleError(Exception):
    """A bundle is missing, incomplete, tampered with or of an unsupported format."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict[str, Any]

    @property
    def precisions(self) -> list[str]:
        return list(self.manifest["precisions"])

    def graph_path(self, precision: str, graph: str) -> Path:
        if precision not in self.manifest["precisions"]:
            raise BundleError(f"{self.path}: no {precision!r} graphs; this bundle has {self.precisions}")
        return self.path / self.manifest["precisions"][precision]["files"][graph]

    @property
    def tokenizer_path(self) -> Path:
        return self.path / self.manifest["tokenizer"]


def load_bundle(path: Path | str, verify: bool = True) -> Bundle:
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{path}: no {MANIFEST}; not a model bundle")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{manifest_path}: not valid JSON: {exc}") from exc
    if manifest.get("format") != BUNDLE_FORMAT or manifest.get("format_version") != BUNDLE_FORMAT_VERSION:
        raise BundleError(
            f"{path}: bundle format {manifest.get('format')!r} v{manifest.get('format_version')}, "
            f"this version reads {BUNDLE_FORMAT!r} v{BUNDLE_FORMAT_VERSION}"
        )
    if verify:
        problems = []
        for name, expected in manifest["files"].items():
            file = path / name
            if not file.is_file():
                problems.append(f"{name} is missing")
            elif sha256_file(file) != expected:
                problems.append(f"{name} does not match its sha256 in the manifest")
        if problems:
            raise BundleError(f"{path}: refusing a bundle that fails verification: " + "; ".join(problems))
    return Bundle(path, manifest)
