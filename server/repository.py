"""The model repository: a directory of models and versions, loaded, verified and swapped while
the server runs.

    REPOSITORY/<model>/<version>/manifest.json ...     (version: a positive integer)

A version takes traffic only after its bundle passes verification (every file's sha256 in the
manifest), onnxruntime loads its graphs and a warm-up translation succeeds. The newest ready
version of a model answers requests that name no version; once a newer version is ready, older
ones stop taking new work, finish what they have and are unloaded. A version that fails stays
FAILED (the older one keeps serving) until its files change, when it is tried again. The
directory is rescanned every poll_seconds and on SIGHUP.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from attnserve.server.bundle import Bundle, BundleError, load_bundle
from attnserve.server.engine import Engine, TranslationOptions
from attnserve.server.runtime import choose_providers
from attnserve.server.metrics import Metrics
from attnserve.server.reader import is_reader_bundle
from attnserve.server.scheduler import BatchingConfig, SchedulerGroup

log = logging.getLogger(__name__)



class ModelState(enum.StrEnum):
    """Where a model version is in its life. The values are the API's ModelInfo.State names
    (a StrEnum, so they also compare equal to those strings)."""

    LOADING = "LOADING"  # verifying, loading and warming up
    READY = "READY"  # taking requests
    FAILED = "FAILED"  # refused; tried again once its files change
    UNLOADED = "UNLOADED"  # superseded or removed: takes no new work, finishes what it has

WARM_UP_SENTENCE = "Open the file."


class ModelNotFound(LookupError):
    pass


@dataclasses.dataclass(eq=False)
class ModelVersion:
    name: str
    version: str
    path: Path
    state: ModelState = ModelState.LOADING
    reason: str = ""
    fingerprint: tuple = ()
    bundle: Bundle | None = None
    engine: Engine | None = None
    scheduler: SchedulerGroup | None = None

    @property
    def number(self) -> int:
        return int(self.version)


@dataclasses.dataclass
class EngineConfig:
    device: str = "auto"
    precision: str = "auto"
    threads: int = 0  # onnxruntime threads for the model, split among its instances (0: all cores)
    instances: int = 0  # 0: 2 on CPU with 2+ threads, else 1
    step_spinning: bool = False  # decoder-step workers spin between steps (runtime.OnnxRuntime's spin_step)

    def layout(self, on_cuda: bool) -> tuple[int, int]:
        """(instances, threads per instance)."""
        threads = self.threads or os.cpu_count() or 1
        instances = self.instances or (2 if not on_cuda and threads >= 2 else 1)
        return instances, max(1, threads // instances)


def fingerprint(path: Path) -> tuple:
    """What changes when a version's files are rewritten (a half-copied version fails, and is
    tried again once the copy completes)."""
    try:
        return tuple(sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                            for p in path.rglob("*") if p.is_file()))
    except FileNotFoundError:
        return ()


def choose_precision(bundle: Bundle, requested: str, provider_is_cuda: bool) -> str:
    if requested != "auto":
        return requested
    if provider_is_cuda and "fp16" in bundle.precisions:
        return "fp16"
    return "fp32" if "fp32" in bundle.precisions else bundle.precisions[0]


class ModelRepository:
    def __init__(self, root: Path | str, engine_config: EngineConfig, batching: BatchingConfig,
                 metrics: Metrics | None = None, on_change: Callable[[], None] | None = None):
        self.root = Path(root)
        self.engine_config, self.batching, self.metrics = engine_config, batching, metrics
        self.on_change = on_change
        self._versions: dict[tuple[str, str], ModelVersion] = {}
        self._scan_lock = threading.Lock()  # one scan at a time (poller, SIGHUP)
        self._lock = threading.Lock()  # guards _versions for readers
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    # -- lookups (request threads) -------------------------------------------------------------

    def versions(self) -> list[ModelVersion]:
        with self._lock:
            return sorted(self._versions.values(), key=lambda v: (v.name, v.number))

    def model_names(self) -> list[str]:
        return sorted({v.name for v in self.versions()})

    def ready(self, name: str) -> bool:
        return any(v.state == ModelState.READY for v in self.versions() if v.name == name)

    def get(self, name: str, version: str = "") -> ModelVersion:
        """The version that serves (name, version); the newest ready one when version is ''."""
        with self._lock:
            candidates = [v for v in self._versions.values() if v.name == name]
        if not candidates:
            raise ModelNotFound(f"no model {name!r} in the repository (models: {', '.join(self.model_names()) or 'none'})")
        if version:
            match = [v for v in candidates if v.version == version]
            if not match:
                raise ModelNotFound(f"model {name!r} has no version {version!r} "
                                    f"(versions: {', '.join(v.version for v in sorted(candidates, key=lambda v: v.number))})")
            if match[0].state != ModelState.READY:
                raise ModelNotFound(f"model {name!r} version {version} is {match[0].state}"
                                    + (f": {match[0].reason}" if match[0].reason else ""))
            return match[0]
        ready = [v for v in candidates if v.state == ModelState.READY]
        if not ready:
            states = ", ".join(f"{v.version} {v.state}" for v in candidates)
            raise ModelNotFound(f"model {name!r} has no ready version ({states})")
        return max(ready, key=lambda v: v.number)

    # -- scanning --------------------------------------------------------------------------------

    def scan(self) -> None:
        """Load new (or changed, previously failed) versions, retire superseded and removed ones."""
        with self._scan_lock:
            found = self._on_disk()
            with self._lock:
                known = dict(self._versions)
            for key, path in sorted(found.items(), key=lambda kv: (kv[0][0], int(kv[0][1]))):
                current = known.get(key)
                if current is None or (current.state == ModelState.FAILED and current.fingerprint != fingerprint(path)):
                    self._load(ModelVersion(key[0], key[1], path))
            for key, version in known.items():
                if key not in found:
                    self._retire(version, "removed from the repository")
            self._retire_superseded()
            self._restore_rolled_back(found)
        if self.on_change is not None:
            self.on_change()

    def _on_disk(self) -> dict[tuple[str, str], Path]:
        found = {}
        if not self.root.is_dir():
            log.error("model repository %s is not a directory", self.root)
            return found
        for model_dir in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for version_dir in model_dir.iterdir():
                if version_dir.is_dir() and version_dir.name.isdigit() and int(version_dir.name) > 0:
                    if is_reader_bundle(version_dir):  # an image reader's: server/reader_service.py serves it
                        continue
                    found[(model_dir.name, version_dir.name)] = version_dir
        return found

    def _load(self, version: ModelVersion) -> None:
        with self._lock:
            self._versions[(version.name, version.version)] = version
        version.fingerprint = fingerprint(version.path)
        started = time.monotonic()
        engines: list[Engine] = []
        try:
            bundle = load_bundle(version.path, verify=True)
            config = self.engine_config
            on_cuda = choose_providers(config.device)[0] == "CUDAExecutionProvider"
            instances, threads = config.layout(on_cuda)
            precision = choose_precision(bundle, config.precision, on_cuda)
            observer = self.metrics.run_observer(version.name) if self.metrics is not None else None
            for _ in range(instances):
                engines.append(Engine(bundle, precision, config.device, threads, run_observer=observer,
                                      spin_step=config.step_spinning))
            for engine in engines:
                engine.warm_up()
                hypotheses = engine.translate([WARM_UP_SENTENCE], TranslationOptions(beam_size=2))[0]
                if not hypotheses or not hypotheses[0].text.strip():
                    raise BundleError("the warm-up translation came back empty")
            engine = engines[0]
        except Exception as exc:  # anything wrong with a new version must leave the others serving
            for engine in engines:
                engine.close()
            version.state, version.reason = ModelState.FAILED, str(exc)
            log.error("model %s version %s refused: %s", version.name, version.version, exc)
            if self.metrics is not None:
                self.metrics.load_failures.labels(version.name).inc()
            return
        version.bundle, version.engine = bundle, engine
        version.scheduler = SchedulerGroup(engines, version.name, self.batching, self.metrics)
        version.state, version.reason = ModelState.READY, ""
        if self.metrics is not None:
            self.metrics.model_info.labels(version.name, version.version, engine.precision, engine.provider).set(1)
        log.info("model %s version %s ready (%s, %s, %d instance(s) x %d thread(s)) in %.1f s; warm-up: %r -> %r",
                 version.name, version.version, engine.precision, engine.provider, instances, threads,
                 time.monotonic() - started, WARM_UP_SENTENCE, hypotheses[0].text)

    def _restore_rolled_back(self, found: dict[tuple[str, str], Path]) -> None:
        """A model left without a ready version (its newest was removed: a rollback) gets its
        newest unloaded version back."""
        for name in self.model_names():
            versions = [v for v in self.versions() if v.name == name]
            if any(v.state == ModelState.READY for v in versions):
                continue
            unloaded = [v for v in versions if v.state == ModelState.UNLOADED and (v.name, v.version) in found]
            if unloaded:
                newest = max(unloaded, key=lambda v: v.number)
                self._load(ModelVersion(newest.name, newest.version, newest.path))

    def _retire_superseded(self) -> None:
        newest: dict[str, int] = {}
        for v in self.versions():
            if v.state == ModelState.READY:
                newest[v.name] = max(newest.get(v.name, 0), v.number)
        for v in self.versions():
            if v.state == ModelState.READY and v.number < newest[v.name]:
                self._retire(v, f"superseded by version {newest[v.name]}")

    def _retire(self, version: ModelVersion, reason: str) -> None:
        """Stop new work for this version; its scheduler finishes what it has in the background,
        then its engines release their sessions (memory comes back when the version is done,
        not whenever the garbage collector gets to it)."""
        log.info("model %s version %s unloaded: %s", version.name, version.version, reason)
        version.state, version.reason = ModelState.UNLOADED, reason
        scheduler, engine = version.scheduler, version.engine
        if self.metrics is not None and engine is not None:
            try:
                self.metrics.model_info.remove(version.name, version.version, engine.precision, engine.provider)
            except KeyError:
                pass
        if scheduler is not None:
            threading.Thread(target=_close_when_done, args=(scheduler,), name=f"retire-{version.name}-{version.version}",
                             daemon=True).start()
        version.engine = version.scheduler = None
        if not version.path.exists():
            with self._lock:
                self._versions.pop((version.name, version.version), None)
        # else it stays listed as UNLOADED, so that ListModels shows why

    # -- lifecycle -------------------------------------------------------------------------------

    def start_polling(self, interval: float) -> None:
        if interval <= 0:
            return

        def poll() -> None:
            while not self._stop.wait(interval):
                try:
                    self.scan()
                except Exception:
                    log.exception("model repository scan failed")

        self._poller = threading.Thread(target=poll, name="repository-poller", daemon=True)
        self._poller.start()

    def rescan_in_background(self) -> None:
        """For SIGHUP: a signal handler must return at once."""
        threading.Thread(target=self.scan, name="repository-rescan", daemon=True).start()

    def close(self, timeout: float | None = None) -> None:
        """Stop polling; let every scheduler finish its work (up to timeout seconds in all)."""
        self._stop.set()
        deadline = None if timeout is None else time.monotonic() + timeout
        for version in self.versions():
            if version.scheduler is not None:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not version.scheduler.close(left):
                    log.warning("model %s version %s still had work at shutdown", version.name, version.version)
                    continue  # its engines are still decoding: they go with the process
                for engine in version.scheduler.engines:
                    engine.close()


def _close_when_done(scheduler: SchedulerGroup) -> None:
    """A retired version's scheduler finishes its work, then its engines are closed."""
    scheduler.close()
    for engine in scheduler.engines:
        engine.close()
