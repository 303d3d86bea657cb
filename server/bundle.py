"""Model bundles: a directory with ONNX graphs, a SentencePiece model and manifest.json.

Loading reads the manifest into its typed records (attnserve/bundle_format.py: a manifest of
another format version is refused, naming both versions) and verifies the sha256 of every file
the manifest names before anything is used, so a truncated copy, a tampered graph or a missing
tokenizer is refused with a clear error. The manifest cannot hold its own sha256: it is checked
by being read into its records instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path

from attnserve.bundle_format import MANIFEST_FILE, BundleError, GraphFiles, Manifest

log = logging.getLogger(__name__)

__all__ = ["Bundle", "BundleError", "MANIFEST_FILE", "load_bundle", "sha256_file"]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: Manifest

    @property
    def precisions(self) -> list[str]:
        return list(self.manifest.precisions)

    def graph_files(self, precision: str) -> GraphFiles:
        """The paths of one precision's graphs."""
        if precision not in self.manifest.precisions:
            raise BundleError(f"{self.path}: no {precision!r} graphs; this bundle has {self.precisions}")
        files = self.manifest.precisions[precision].files
        return GraphFiles(str(self.path / files.encoder), str(self.path / files.decoder_step))

    @property
    def tokenizer_path(self) -> Path:
        return self.path / self.manifest.tokenizer


def load_bundle(path: Path | str, verify: bool = True) -> Bundle:
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise BundleError(f"{path}: no {MANIFEST_FILE}; not a model bundle")
    manifest = Manifest.read(manifest_path)  # FormatVersionError, ManifestError
    if verify:
        problems = []
        for name, expected in manifest.files.items():
            file = path / name
            if not file.is_file():
                problems.append(f"{name} is missing")
            elif sha256_file(file) != expected:
                problems.append(f"{name} does not match its sha256 in the manifest")
        if problems:
            raise BundleError(f"{path}: refusing a bundle that fails verification: " + "; ".join(problems))
    return Bundle(path, manifest)
