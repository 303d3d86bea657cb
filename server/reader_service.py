"""The Reader gRPC service (protos/attnserve/v1/reader.proto): house numbers read from images,
with one attention map per emitted symbol.

Reader bundles live in the same model repository as the translators
(REPOSITORY/<name>/<version>/, manifest format attnserve-reader; the translators' repository
skips them). A version serves once its bundle verifies (sha256s), its graphs load and a warm-up
read succeeds; the newest such version answers requests that name none. The repository is
rescanned with the translators' (every poll_seconds, and on SIGHUP), so a new version or a
rewritten one is picked up while the server runs, and a version whose directory is gone stops
serving. Reading is synchronous in the RPC's thread: a read is a few milliseconds of CPU and
needs no batching to be cheap.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np

from attnserve.server.deadlines import deadline_in
from attnserve.server.errors import RequestError
from attnserve.server.reader import ImageError, OrtReader, ReaderBundleError, is_reader_bundle
from attnserve.server.repository import fingerprint
from attnserve.v1 import reader_pb2 as pb
from attnserve.v1 import reader_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

READER_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Reader"].full_name
DEFAULT_READER = "house-numbers"
MAX_IMAGES_PER_REQUEST = 64


@dataclasses.dataclass(eq=False)
class ReaderVersion:
    name: str
    version: str
    path: Path
    fingerprint: tuple = ()
    reader: OrtReader | None = None
    reason: str = ""  # why it failed, when it did


class ReaderRepository:
    """The reader bundles of a model repository, loaded and swapped while the server runs."""

    def __init__(self, root: Path | str, threads: int = 1, on_change: Callable[[], None] | None = None):
        self.root = Path(root)
        self.threads = threads
        self.on_change = on_change
        self._versions: dict[tuple[str, str], ReaderVersion] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def scan(self) -> None:
        found = {}
        if self.root.is_dir():
            for model_dir in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
                for version_dir in model_dir.iterdir():
                    if version_dir.name.isdigit() and int(version_dir.name) > 0 and is_reader_bundle(version_dir):
                        found[(model_dir.name, version_dir.name)] = version_dir
        changed = False
        for key, path in found.items():
            known = self._versions.get(key)
            if known is None or known.fingerprint != fingerprint(path):
                self._load(ReaderVersion(*key, path))
                changed = True
        with self._lock:
            for key in [k for k in self._versions if k not in found]:
                log.info("reader %s/%s removed: no longer served", *key)
                del self._versions[key]
                changed = True
        if changed and self.on_change is not None:
            self.on_change()

    def _load(self, version: ReaderVersion) -> None:
        version.fingerprint = fingerprint(version.path)
        try:
            reader = OrtReader(version.path, threads=self.threads)
            size = reader.input
            reader.read(np.zeros((1, size.height, size.width, size.channels), dtype=np.uint8))  # warm-up
            version.reader = reader
            log.info("reader %s/%s ready (%s)", version.name, version.version, reader.manifest.model)
        except (ReaderBundleError, OSError, ValueError, KeyError, RuntimeError) as exc:  # onnxruntime raises RuntimeErrors
            version.reason = str(exc)
            with self._lock:
                previous = self._versions.get((version.name, version.version))
            if previous is not None and previous.reader is not None:
                # Changed in place into something unloadable (a half-copied or tampered bundle):
                # refuse the change and go on serving what was loaded; retried when it changes again.
                log.error("reader %s/%s changed and failed to load (%s); the previous load goes on serving",
                          version.name, version.version, exc)
                previous.fingerprint, previous.reason = version.fingerprint, version.reason
                return
            log.error("reader %s/%s failed to load: %s", version.name, version.version, exc)
        with self._lock:
            self._versions[(version.name, version.version)] = version

    def names(self) -> list[str]:
        with self._lock:
            return sorted({name for name, _ in self._versions})

    def ready(self, name: str) -> bool:
        with self._lock:
            return any(v.reader is not None for (n, _), v in self._versions.items() if n == name)

    def get(self, name: str, version: str = "") -> ReaderVersion:
        with self._lock:
            candidates = [v for (n, number), v in self._versions.items()
                          if n == name and v.reader is not None and (not version or number == version)]
        if not candidates:
            raise LookupError(f"no ready reader {name!r}" + (f" version {version}" if version else ""))
        return max(candidates, key=lambda v: int(v.version))

    def start_polling(self, interval: float) -> None:
        def poll() -> None:
            while not self._stop.wait(interval):
                try:
                    self.scan()
                except Exception:  # a poll must never kill the thread
                    log.exception("reader repository scan failed")

        if interval > 0:
            threading.Thread(target=poll, name="reader-repository-poll", daemon=True).start()

    def close(self) -> None:
        self._stop.set()


class ReaderServicer(pb_grpc.ReaderServicer):
    """Read: images in; text, score and per-symbol attention maps with the grid out."""

    def __init__(self, repository: ReaderRepository, record: Callable[[str, str, grpc.StatusCode], None],
                 default_model: str = DEFAULT_READER):
        self.repository, self.record, self.default_model = repository, record, default_model

    def Read(self, request: pb.ReadRequest, context: grpc.ServicerContext) -> pb.ReadResponse:
        name = request.model or self.default_model
        code = grpc.StatusCode.OK
        try:
            return self._read(request, name, context)
        except RequestError as refusal:
            code = refusal.code
            context.abort(refusal.code, str(refusal))
        except Exception:
            code = grpc.StatusCode.INTERNAL
            log.exception("Read failed")
            context.abort(grpc.StatusCode.INTERNAL, "internal error")
        finally:
            self.record("Read", name, code)

    def _read(self, request: pb.ReadRequest, name: str, context: grpc.ServicerContext) -> pb.ReadResponse:
        deadline = deadline_in(context.time_remaining())
        if not request.images:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "no images: send at least one encoded image")
        if len(request.images) > MAX_IMAGES_PER_REQUEST:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"{len(request.images)} images; at most {MAX_IMAGES_PER_REQUEST} per request")
        try:
            version = self.repository.get(name, request.version)
        except LookupError as exc:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"{exc}; readers: {self.repository.names() or 'none'}") from None
        reader = version.reader
        try:
            readings = reader.read_images(list(request.images))
        except ImageError as exc:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        if deadline is not None and time.monotonic() > deadline:
            raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded while reading")
        grid = reader.manifest.grid
        response = pb.ReadResponse(model=version.name, version=version.version, grid=pb.Grid(
            rows=grid.rows, cols=grid.cols, input_height=reader.input.height,
            input_width=reader.input.width, cell_height=grid.cell_height, cell_width=grid.cell_width))
        for reading in readings:
            symbols = [*reading.text, "</s>"]
            response.readings.append(pb.Reading(text=reading.text, score=reading.score, symbols=[
                pb.SymbolAttention(symbol=s, weights=weights.tolist()) for s, weights in zip(symbols, reading.attention)]))
        return response
