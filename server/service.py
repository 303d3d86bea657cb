"""The gRPC translation service: attnserve.v1.Translator, grpc.health.v1 and server reflection.

    server, port = create_server(config)
    server.start()
    ...
    server.stop(grace)          # NOT_SERVING, refuse new RPCs, let in-flight ones finish

Requests are checked here (model, options, limits), tokenised, and handed to the model's
Scheduler as Jobs; batching lives there. Every failure is answered with a status code and a
message saying what was wrong; nothing a client sends can stop the server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from typing import TYPE_CHECKING, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from attnserve.v1 import reader_pb2_grpc
from attnserve.v1 import translator_pb2 as pb
from attnserve.v1 import translator_pb2_grpc as pb_grpc
from attnserve.server.auth import ClientKeys
from attnserve.server.config import ServerConfig
from attnserve.server.deadlines import deadline_in, timeout_until
from attnserve.server.engine import Hypothesis, TranslationOptions
from attnserve.server.errors import RequestError
from attnserve.server.metrics import Metrics
from attnserve.server.reader_service import DEFAULT_READER, READER_SERVICE_NAME, ReaderRepository, ReaderServicer
from attnserve.server.repository import EngineConfig, ModelNotFound, ModelRepository, ModelVersion
from attnserve.server.scheduler import BatchingConfig, Job, SchedulerError
from attnserve.server.text import (Glossary, GlossaryEntry, GlossaryError, PipelineConfig, Plan, TextError, TextFormat,
                                   TextItem, TextPipeline)

if TYPE_CHECKING:
    from attnserve.server.http import HttpGateway

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Translator"].full_name  # attnserve.v1.Translator
HEALTH_METHOD_PREFIX = f"/{health.SERVICE_NAME}/"
STATES = {"LOADING": pb.ModelInfo.LOADING, "READY": pb.ModelInfo.READY, "FAILED": pb.ModelInfo.FAILED,
          "UNLOADED": pb.ModelInfo.UNLOADED}
TEXT_FORMATS = {pb.SENTENCE: TextFormat.SENTENCE, pb.DOCUMENT: TextFormat.DOCUMENT, pb.HTML: TextFormat.HTML,
                pb.XML: TextFormat.XML}
SCHEDULER_CODES = {
    SchedulerError.QUEUE_FULL: grpc.StatusCode.RESOURCE_EXHAUSTED,
    SchedulerError.CLOSED: grpc.StatusCode.UNAVAILABLE,
    SchedulerError.EXPIRED: grpc.StatusCode.DEADLINE_EXCEEDED,
    SchedulerError.CANCELLED: grpc.StatusCode.CANCELLED,
    SchedulerError.FAILED: grpc.StatusCode.INTERNAL,
}


class CallContext(Protocol):
    """What the service layer needs of a call, whatever the transport: grpc.ServicerContext has
    these methods, and the HTTP gateway has its own implementation (server/http.py)."""

    def time_remaining(self) -> float | None: ...

    def add_callback(self, callback: Callable[[], None]) -> bool: ...

    def is_active(self) -> bool: ...


class _Call:
    """What the metrics need to know about one call."""

    def __init__(self) -> None:
        self.model = ""
        self.code = grpc.StatusCode.OK


@dataclasses.dataclass
class TextRequest:
    """Texts through the pipeline, between prepare_text and finish_text: the plan and the
    model inputs (source ids) its sentences became."""

    pipeline: TextPipeline
    plan: Plan
    sources: list[list[int]]
    constraints: list[list[list[int]] | None] | None  # glossary targets per source (ids), None: no glossary


class TranslationService:
    """The one service layer of every transport: request validation, limits, client keys and
    rate limits, deadlines, metrics, and the translation itself (scheduler jobs, the text
    pipeline). gRPC (TranslatorServicer) and HTTP (server/http.py) only convert wire formats and
    map RequestError to their status codes."""

    def __init__(self, config: ServerConfig, repository: ModelRepository, metrics: Metrics):
        self.config, self.repository, self.metrics = config, repository, metrics
        self.keys = ClientKeys.from_config(config.token(), config.api_keys_file, config.rate_limit_per_minute)
        self.draining = threading.Event()
        self._pipelines: dict[int, tuple[ModelVersion, TextPipeline]] = {}  # per model version
        self._pipelines_lock = threading.Lock()

    # -- calls -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def call(self, rpc: str, context: CallContext) -> Iterator[_Call]:
        """Counts and times one call, refuses it while draining; RequestError goes out with its
        code, anything unexpected becomes INTERNAL (logged): the server goes on either way."""
        call = _Call()
        started = time.monotonic()
        self.metrics.inflight.inc()
        try:
            if self.draining.is_set():
                raise RequestError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry on another replica")
            yield call
        except RequestError as exc:
            call.code = exc.code
            raise
        except GeneratorExit:
            call.code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            call.code = grpc.StatusCode.INTERNAL
            log.exception("%s failed", rpc)
            raise RequestError(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}") from exc
        finally:
            if call.code == grpc.StatusCode.OK and not context.is_active():
                call.code = grpc.StatusCode.CANCELLED
            self.metrics.inflight.dec()
            self.record(rpc, call.model, call.code)
            self.metrics.request_latency.labels(rpc).observe(time.monotonic() - started)

    def record(self, rpc: str, model: str, code: grpc.StatusCode) -> None:
        self.metrics.requests.labels(rpc, model, code.name).inc()

    def authorize(self, credential: str | None) -> str | None:
        """The client key `credential` matches (None when the server needs none); refuses a
        missing or unknown key (UNAUTHENTICATED) and a key over its rate (RESOURCE_EXHAUSTED)."""
        if not self.keys.required:
            return None
        if not credential:
            raise RequestError(grpc.StatusCode.UNAUTHENTICATED, "a client key is required (authorization: Bearer <key>, "
                               "or api_key for the LibreTranslate API)", reason="missing_key")
        key = self.keys.match(credential)
        if key is None:
            raise RequestError(grpc.StatusCode.UNAUTHENTICATED, "invalid client key", reason="bad_key")
        wait = self.keys.take(key)
        if wait:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"rate limit of {self.keys.limit_of(key)} requests per minute reached; retry in {wait:.1f} s",
                               reason="rate_limited", retry_after=wait)
        return key

    # -- translation -----------------------------------------------------------------------------

    def translate(self, request: pb.TranslateRequest, context: CallContext, call: _Call) -> pb.TranslateResponse:
        model = self.model(request.model, request.version)
        call.model = model.name
        self.check_texts(request.sentences)
        opts = self.options(request.options, model)
        response = pb.TranslateResponse(model=model.name, version=model.version)
        if request.options.text_format:  # the text pipeline: documents, markup, placeholders
            text = self.prepare_text(model, request.options, opts, request.sentences, lambda i: f"sentence {i}")
            hypotheses = ([hyps[0] for hyps in self.run_job(model, text.sources, opts, context, text.constraints)]
                          if text.sources else [])
            again = self.fallback_text(model, text, hypotheses)
            for index, hyps in zip(again, self.run_job(model, list(again.values()), opts, context) if again else []):
                hypotheses[index] = hyps[0]
            response.translations.extend(self.finish_text(text, hypotheses))
            return response
        sources = [self.encode(model, text, f"sentence {i}") for i, text in enumerate(request.sentences)]
        if not sources:
            return response
        for source, hypotheses in zip(sources, self.run_job(model, sources, opts, context)):
            response.translations.append(self.translation(model, source, hypotheses, opts))
        return response

    def run_job(self, model: ModelVersion, sources: list[list[int]], opts: TranslationOptions,
                context: CallContext, constraints: list[list[list[int]] | None] | None = None) -> list[list[Hypothesis]]:
        """One scheduler job for `sources` (with glossary constraints per source, if any),
        waited for until the call's deadline; the hypotheses of each source, or RequestError
        with the scheduler's reason."""
        job = Job(sources, opts, self.deadline(context), constraints=constraints)
        self.submit(model, job)
        context.add_callback(lambda: job.scheduler.cancel(job))  # client gone: stop its work
        if not job.wait(timeout_until(job.deadline)):
            job.scheduler.cancel(job, SchedulerError.EXPIRED)
        if job.error is not None:
            raise RequestError(SCHEDULER_CODES[job.error.reason], str(job.error))
        return job.results

    def check_texts(self, texts: Sequence[str]) -> None:
        """The request-wide limits on texts: how many, how many characters, valid Unicode."""
        if len(texts) > self.config.max_sentences_per_request:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"{len(texts)} sentences in one request; the limit is "
                               f"max_sentences_per_request={self.config.max_sentences_per_request}")
        characters = sum(len(text) for text in texts)
        if characters > self.config.max_characters_per_request:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"request ({characters} characters) exceeds the text limit "
                               f"max_characters_per_request={self.config.max_characters_per_request}")
        for i, text in enumerate(texts):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate (JSON "\ud800"): no UTF-8, no tokens
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"sentence {i} is not valid Unicode (a lone surrogate code point)") from None

    def prepare_text(self, model: ModelVersion, options: pb.TranslationOptions, opts: TranslationOptions,
                     texts: Sequence[str], name: Callable[[int], str]) -> "TextRequest":
        """The text pipeline's part before the model, for Translate (every sentence of a
        request) and TranslateStream (one item): INVALID_ARGUMENT naming the item (`name(i)`:
        "sentence 1", "item 'a'"), else the plan and the model inputs, tokenised. `opts` is set
        for the pipeline (one hypothesis, with the alignment it projects through)."""
        if options.text_format not in TEXT_FORMATS:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"options: unknown text_format {options.text_format}")
        pipeline = self._pipeline(model, options)
        try:
            glossary = Glossary([GlossaryEntry.checked(e.source, e.target, f"glossary entry {i}")
                                 for i, e in enumerate(options.glossary)]) if options.glossary else None
            plan = pipeline.prepare([TextItem(text, TEXT_FORMATS[options.text_format], glossary) for text in texts])
        except TextError as exc:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"{name(exc.item)}: {exc.reason}") from None
        except GlossaryError as exc:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"options: {exc}") from None
        opts.return_alignment, opts.nbest = True, 1
        # The pipeline cuts sentences to the model's limit, so this refuses almost nothing (a
        # sentence whose masks outgrow the margin); the plan does not say whose sentence it is.
        what = name(0) if len(texts) == 1 else "the request"
        sources = [self.encode(model, text, f"a sentence of {what}") for text in plan.sources]
        constraints = ([model.engine.encode_constraints(terms) for terms in plan.constraints]
                       if any(plan.constraints) else None)
        return TextRequest(pipeline, plan, sources, constraints)

    def fallback_text(self, model: ModelVersion, text: "TextRequest", hypotheses: Sequence[Hypothesis]) -> dict[int, list[int]]:
        """The sentences to translate again with their glossary terms substituted (the search
        had to force a term where the model would end: pipeline.fallback), as model inputs."""
        if text.constraints is None:
            return {}
        return {index: self.encode(model, source, "a sentence of the request")
                for index, source in text.pipeline.fallback(text.plan, hypotheses).items()}

    @staticmethod
    def finish_text(text: "TextRequest", hypotheses: Sequence[Hypothesis]) -> list[pb.Translation]:
        """The pipeline's part after the model: one Translation per item, its text in
        hypotheses[0], with confidence, flags, placeholders and segments."""
        translations = []
        for result in text.pipeline.finish(text.plan, hypotheses):
            translation = pb.Translation(confidence=result.confidence, flags=result.flags, placeholders=result.placeholders)
            translation.hypotheses.add(text=result.text, score=result.confidence)
            for segment in result.segments:
                translation.segments.add(source=segment.source, translation=segment.translation,
                                         confidence=segment.confidence, flags=segment.flags)
            translations.append(translation)
        return translations

    def _pipeline(self, model: ModelVersion, options: pb.TranslationOptions) -> TextPipeline:
        """The model version's text pipeline (built once: it holds the bundle's glossary), with
        this request's confidence threshold."""
        with self._pipelines_lock:
            pipeline = self._pipelines.get(id(model))
            if pipeline is None or pipeline[0] is not model:
                config = PipelineConfig(max_source_tokens=min(self.config.max_tokens_per_sentence, model.engine.max_len - 1),
                                        glossary_mode=self.config.glossary_mode)
                self._pipelines[id(model)] = pipeline = (model, TextPipeline.for_engine(model.engine, config))
        low = options.low_confidence if options.HasField("low_confidence") else None
        if low is None:
            return pipeline[1]
        return TextPipeline(pipeline[1].tokenizer, dataclasses.replace(pipeline[1].config, low_confidence=low),
                            pipeline[1].glossary)

    def list_models(self) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[self.info(v) for v in self.repository.versions()])

    def get_model(self, request: pb.GetModelRequest, call: _Call) -> pb.ModelInfo:
        name = request.name or self.config.default_model
        call.model = name if name in self.repository.model_names() else ""  # no metric label from a client's string
        versions = [v for v in self.repository.versions() if v.name == name]
        if request.version:
            versions = [v for v in versions if v.version == request.version]
        if not versions:
            what = f"model {name!r}" + (f" version {request.version!r}" if request.version else "")
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"no {what} in the repository")
        ready = [v for v in versions if v.state == "READY"]
        return self.info(max(ready or versions, key=lambda v: v.number))

    def ready(self, model: str = "") -> bool:
        """What the readiness probes report: not draining and the model (default: the default
        model) ready."""
        return not self.draining.is_set() and self.repository.ready(model or self.config.default_model)

    # -- helpers ---------------------------------------------------------------------------------

    def model(self, name: str, version: str) -> ModelVersion:
        try:
            return self.repository.get(name or self.config.default_model, version)
        except ModelNotFound as exc:
            raise RequestError(grpc.StatusCode.NOT_FOUND, str(exc)) from None

    def options(self, options: pb.TranslationOptions, model: ModelVersion) -> TranslationOptions:
        beam = options.beam_size or self.config.default_beam_size
        if beam > self.config.max_beam_size:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"beam_size {beam} exceeds the limit max_beam_size={self.config.max_beam_size}")
        nbest = options.nbest or 1
        if nbest > beam:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"nbest {nbest} exceeds beam_size {beam}")
        opts = TranslationOptions(beam_size=beam, nbest=nbest, return_alignment=options.return_alignment)
        if options.HasField("length_penalty"):
            if not 0.0 <= options.length_penalty <= 10.0:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"length_penalty {options.length_penalty} is outside [0, 10]")
            opts.length_penalty = options.length_penalty
        if options.max_length:
            opts.max_len_a, opts.max_len_b = 0.0, min(options.max_length, model.engine.max_len - 1)
        return opts

    def encode(self, model: ModelVersion, text: str, what: str) -> list[int]:
        engine = model.engine
        ids = engine.tokenizer.encode(text)
        limit = min(self.config.max_tokens_per_sentence, engine.max_len - 1)
        if len(ids) > limit:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"{what} has {len(ids)} subword tokens; the limit is max_tokens_per_sentence={limit}")
        return ids + [engine.eos]

    def deadline(self, context: CallContext) -> float | None:
        # No deadline is a huge time_remaining() in gRPC, not None: deadline_in makes it None.
        return deadline_in(context.time_remaining())

    def submit(self, model: ModelVersion, job: Job) -> None:
        if job.deadline is not None and time.monotonic() >= job.deadline:
            raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before the request was queued")
        scheduler = model.scheduler
        if scheduler is None:  # unloaded between the lookup and now
            raise RequestError(grpc.StatusCode.UNAVAILABLE, f"model {model.name} version {model.version} was unloaded; retry")
        try:
            scheduler.submit(job)  # sets job.scheduler: the instance that has it, to cancel it there
        except SchedulerError as exc:
            raise RequestError(SCHEDULER_CODES[exc.reason], str(exc)) from None

    def translation(self, model: ModelVersion, source: list[int], hypotheses: list[Hypothesis],
                    opts: TranslationOptions) -> pb.Translation:
        tokenizer = model.engine.tokenizer if model.engine is not None else None
        translation = pb.Translation()
        texts = tokenizer.decode([h.tokens for h in hypotheses]) if tokenizer is not None else ["" for _ in hypotheses]
        for hypothesis, text in zip(hypotheses, texts):
            out = translation.hypotheses.add(text=text, score=hypothesis.score)
            if opts.return_alignment and hypothesis.alignment is not None:
                pieces = [tokenizer.id_to_piece(t) for t in hypothesis.tokens]
                out.target_tokens.extend(pieces + ["</s>"] * (len(hypothesis.alignment) - len(pieces)))
                for row in hypothesis.alignment:
                    out.alignment.add(weights=row)
        if opts.return_alignment and tokenizer is not None:
            translation.source_tokens.extend([tokenizer.id_to_piece(t) for t in source[:-1]] + ["</s>"])
        return translation

    def info(self, version: ModelVersion) -> pb.ModelInfo:
        info = pb.ModelInfo(name=version.name, version=version.version, state=STATES[version.state],
                            state_reason=version.reason, is_default=version.name == self.config.default_model)
        manifest = version.bundle.manifest if version.bundle is not None else None
        if manifest is None:
            return info
        info.source_language, info.target_language = manifest.languages.source, manifest.languages.target
        info.architecture, info.attention = manifest.architecture, manifest.attention
        info.parameters = manifest.parameters
        if version.engine is not None:
            info.precision, info.execution_provider = version.engine.precision, version.engine.provider
            validation = manifest.validation_of(version.engine.precision)
            if validation is not None and validation.test_bleu is not None:
                info.test_bleu = validation.test_bleu
        return info


class TranslatorServicer(pb_grpc.TranslatorServicer):
    """attnserve.v1.Translator over gRPC: the service layer, with RequestError as the status."""

    def __init__(self, service: TranslationService):
        self.service = service

    @property
    def draining(self) -> threading.Event:
        return self.service.draining

    def Translate(self, request: pb.TranslateRequest, context: grpc.ServicerContext) -> pb.TranslateResponse:
        with self._rpc("Translate", context) as call:
            return self.service.translate(request, context, call)

    def TranslateStream(self, request_iterator: Iterator[pb.TranslateStreamRequest],
                        context: grpc.ServicerContext) -> Iterator[pb.TranslateStreamResponse]:
        with self._rpc("TranslateStream", context) as call:
            yield from _Stream(self.service, request_iterator, context, call).responses()

    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext) -> pb.ListModelsResponse:
        with self._rpc("ListModels", context):
            return self.service.list_models()

    def GetModel(self, request: pb.GetModelRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        with self._rpc("GetModel", context) as call:
            return self.service.get_model(request, call)

    @contextlib.contextmanager
    def _rpc(self, rpc: str, context: grpc.ServicerContext):
        try:
            with self.service.call(rpc, context) as call:
                yield call
        except RequestError as exc:
            context.abort(exc.code, str(exc))


class _Stream:
    """One TranslateStream call. A reader thread takes items as they come and queues their
    jobs; `responses()`, in the handler thread, sends each result the moment the scheduler
    delivers it. Every item gets exactly one response: its translation or its own error. At most
    `stream_window` items are in flight: beyond that the reader stops reading, and HTTP/2 flow
    control holds the client back, so a stream of any length neither fills the server's queue
    nor its memory.

    Three threads touch its state: the reader (items read, jobs in flight), the scheduler
    (answers, jobs done) and the handler (answers sent), plus gRPC's callback thread on cancel.
    `_lock` guards the counts and the in-flight set; the answer queue and the window semaphore
    are thread-safe themselves."""

    def __init__(self, service: TranslationService, items: Iterator[pb.TranslateStreamRequest],
                 context: grpc.ServicerContext, call: _Call):
        self.service, self.items, self.context, self.call = service, items, context, call
        self.deadline = service.deadline(context)
        # Responses are built by the handler thread (from these thunks), not the scheduler's.
        self.answers: queue.Queue[Callable[[], pb.TranslateStreamResponse] | None] = queue.Queue()
        self.window = threading.Semaphore(service.config.stream_window)
        self.reader_done = threading.Event()
        self._lock = threading.Lock()
        self._items_read = 0
        self._items_answered = 0
        self._in_flight: set[Job] = set()

    # -- the handler thread ----------------------------------------------------------------------

    def responses(self) -> Iterator[pb.TranslateStreamResponse]:
        self.context.add_callback(self.cancel_all)
        threading.Thread(target=self._read, name="stream-reader", daemon=True).start()
        while self.context.is_active():
            if self.reader_done.is_set() and self._all_answered():
                return
            try:
                make = self.answers.get(timeout=0.1)
            except queue.Empty:
                if self.deadline is not None and time.monotonic() > self.deadline:
                    self.cancel_all(SchedulerError.EXPIRED)  # items answer DEADLINE_EXCEEDED, not CANCELLED
                continue
            if make is None:
                continue  # the reader finished: check again
            with self._lock:
                self._items_answered += 1
            yield make()
        self.cancel_all()

    def _all_answered(self) -> bool:
        with self._lock:
            return self._items_answered == self._items_read

    # -- the reader thread -----------------------------------------------------------------------

    def _read(self) -> None:
        try:
            for item in self.items:
                while not self.window.acquire(timeout=0.1):
                    if not self.context.is_active():
                        return
                with self._lock:
                    self._items_read += 1
                self._start(item)
        except grpc.RpcError:
            pass  # the client went away: the cancel callback stops what is left
        except Exception:
            log.exception("TranslateStream reader failed")
        finally:
            self.reader_done.set()
            self.answers.put(None)  # wake the handler

    def _start(self, item: pb.TranslateStreamRequest) -> None:
        service = self.service
        text = None
        try:
            model = service.model(item.model, item.version)
            self.call.model = self.call.model or model.name
            service.check_texts([item.sentence])
            opts = service.options(item.options, model)
            if item.options.text_format:  # the text pipeline, as Translate runs it, for this item alone
                text = service.prepare_text(model, item.options, opts, [item.sentence], lambda _: f"item {item.id!r}")
                sources = text.sources
            else:
                sources = [service.encode(model, item.sentence, f"item {item.id!r}")]
        except RequestError as exc:
            self._error(item.id, exc.code, str(exc))
            return

        def respond(translation: Callable[[], pb.Translation], job: Job | None) -> None:
            # Built by the handler thread when it sends the answer, not here (a scheduler thread).
            self._answer(lambda: pb.TranslateStreamResponse(id=item.id, translation=translation(), model=model.name,
                                                            version=model.version), job)

        if text is not None and not sources:  # nothing for the model (no letters): the pipeline copies it
            respond(lambda: service.finish_text(text, [])[0], None)
            return

        def on_result(_index: int, hypotheses: list[Hypothesis]) -> None:
            if text is None:
                respond(lambda: service.translation(model, sources[0], hypotheses, opts), job)
            elif job.remaining == 0:  # the item's last sentence (deliver counts it before calling)
                best = [hyps[0] for hyps in job.results]
                try:
                    again = service.fallback_text(model, text, best)
                except RequestError as exc:
                    self._error(item.id, exc.code, str(exc), model.name, model.version, job)
                    return
                if again:
                    self._retry(item.id, model, opts, text, best, again, job, respond)
                else:
                    respond(lambda: service.finish_text(text, best)[0], job)

        def on_error(exc: SchedulerError) -> None:
            self._error(item.id, SCHEDULER_CODES[exc.reason], str(exc), model.name, model.version, job)

        job = Job(sources, opts, self.deadline, on_result=on_result, on_error=on_error,
                  constraints=text.constraints if text is not None else None)
        with self._lock:
            self._in_flight.add(job)
        try:
            service.submit(model, job)
        except RequestError as exc:
            self._error(item.id, exc.code, str(exc), model.name, model.version, job)

    def _retry(self, item_id: str, model: ModelVersion, opts: TranslationOptions, text: TextRequest,
               best: list[Hypothesis], again: dict[int, list[int]], first: Job,
               respond: Callable[[Callable[[], pb.Translation], Job | None], None]) -> None:
        """The item's second job: its sentences whose glossary term falls back to substitution
        (from the scheduler thread that finished the first)."""
        service = self.service

        def on_result(_index: int, _hypotheses: list[Hypothesis]) -> None:
            if retry.remaining == 0:
                for index, hyps in zip(again, retry.results):
                    best[index] = hyps[0]
                respond(lambda: service.finish_text(text, best)[0], retry)

        def on_error(exc: SchedulerError) -> None:
            self._error(item_id, SCHEDULER_CODES[exc.reason], str(exc), model.name, model.version, retry)

        retry = Job(list(again.values()), opts, self.deadline, on_result=on_result, on_error=on_error)
        with self._lock:
            self._in_flight.add(retry)
            self._in_flight.discard(first)
        try:
            service.submit(model, retry)
        except RequestError as exc:
            self._error(item_id, exc.code, str(exc), model.name, model.version, retry)

    # -- answers, from any thread ----------------------------------------------------------------

    def _answer(self, make: Callable[[], pb.TranslateStreamResponse], job: Job | None = None) -> None:
        if job is not None:
            with self._lock:
                self._in_flight.discard(job)
        self.answers.put(make)
        self.window.release()

    def _error(self, item_id: str, code: grpc.StatusCode, message: str, model: str = "", version: str = "",
               job: Job | None = None) -> None:
        self._answer(lambda: pb.TranslateStreamResponse(id=item_id, error=pb.Status(code=code.value[0], message=message),
                                                        model=model, version=version), job)

    def cancel_all(self, reason: str = SchedulerError.CANCELLED) -> None:
        """Cancel every job still in flight, where it is queued (even on a retiring version).
        Cancelling calls on_error, which takes the lock: iterate over a copy, outside it."""
        with self._lock:
            jobs = list(self._in_flight)
        for job in jobs:
            if job.scheduler is not None:
                job.scheduler.cancel(job, reason)


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Requires `authorization: Bearer <key>` (a key the service accepts, within its rate
    limit) on every RPC except health checks (Kubernetes probes carry no credentials)."""

    def __init__(self, service: TranslationService):
        self.service = service

    def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith(HEALTH_METHOD_PREFIX):
            return continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        given = metadata.get("authorization", "")
        given = given.decode("utf-8", "replace") if isinstance(given, bytes) else given
        try:
            self.service.authorize(bearer_credential(given))
            return continuation(handler_call_details)
        except RequestError as exc:
            refusal = exc
        handler = continuation(handler_call_details)
        if handler is None:
            return None  # no such method: UNIMPLEMENTED (and no metric label from a client's string)
        rpc = handler_call_details.method.rsplit("/", 1)[-1]
        self.service.record(rpc, "", refusal.code)
        message = (f"{refusal} (metadata 'authorization: Bearer <token>')"
                   if refusal.code == grpc.StatusCode.UNAUTHENTICATED else str(refusal))

        def deny(request, context):
            context.abort(refusal.code, message)

        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(deny)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(deny)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)


def bearer_credential(header: str) -> str:
    """The key of an `authorization: Bearer <key>` header ("" if there is none)."""
    scheme, _, credential = header.strip().partition(" ")
    return credential.strip() if scheme.lower() == "bearer" else ""


class TranslationServer:
    """The gRPC server with its model repository, health service and metrics endpoint."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.metrics = Metrics()
        self.health = health.HealthServicer(experimental_non_blocking=True,
                                            experimental_thread_pool=futures.ThreadPoolExecutor(max_workers=4))
        self.repository = ModelRepository(
            config.model_repository, EngineConfig(config.device, config.precision, config.threads, config.instances,
                                                  bool(config.step_spinning)),
            BatchingConfig(config.max_batch_tokens, config.max_batch_sentences, config.max_wait_ms, config.max_queue),
            self.metrics, on_change=self.update_health)
        self.service = TranslationService(config, self.repository, self.metrics)
        self.servicer = TranslatorServicer(self.service)
        # The image reader's bundles live in the same repository (server/reader_service.py).
        self.readers = ReaderRepository(config.model_repository, threads=max(config.threads, 1), on_change=self.update_health)
        self.reader_servicer = ReaderServicer(self.readers, self.service.record)
        interceptors = [BearerTokenInterceptor(self.service)] if self.service.keys.required else []
        options = [
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            # Long-lived HTTP/2 connections pin a client to one replica; closing them after a
            # while makes clients re-resolve and spread over new replicas.
            ("grpc.max_connection_age_ms", int(config.max_connection_age * 1000)),
            ("grpc.max_connection_age_grace_ms", int(config.grace_period * 1000)),
            ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share it
            # Ping idle connections to find dead peers (a client gone behind a NAT or a load
            # balancer), and accept clients' keepalive pings down to every 10 s: gRPC's default
            # answers more frequent pings with GOAWAY "too_many_pings".
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ]
        self.grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="rpc"),
                                interceptors=interceptors, options=options, maximum_concurrent_rpcs=config.workers)
        pb_grpc.add_TranslatorServicer_to_server(self.servicer, self.grpc)
        reader_pb2_grpc.add_ReaderServicer_to_server(self.reader_servicer, self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection((SERVICE_NAME, READER_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
                                            self.grpc)
        address = f"{config.host}:{config.port}"
        if config.tls_cert:
            with open(config.tls_key, "rb") as key, open(config.tls_cert, "rb") as cert:
                credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])
            self.port = self.grpc.add_secure_port(address, credentials)
        else:
            self.port = self.grpc.add_insecure_port(address)
        if not self.port:
            raise OSError(f"cannot listen on {address}")
        self.metrics_port = 0
        self.http: HttpGateway | None = None
        self.http_port = 0
        if config.http_port:
            from attnserve.server.http import HttpGateway  # listens now, as add_*_port does: a taken port fails here

            self.http = HttpGateway(self.service, config)
            self.http_port = self.http.port
        self.update_health()

    def update_health(self) -> None:
        if self.service.draining.is_set():
            return  # enter_graceful_shutdown has set everything NOT_SERVING for good
        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        for name in self.repository.model_names():
            self.health.set(name, serving if self.repository.ready(name) else not_serving)
        readers = getattr(self, "readers", None)  # None while __init__ builds the reader repository
        for name in readers.names() if readers is not None else ():
            self.health.set(name, serving if readers.ready(name) else not_serving)
        if readers is not None:
            self.health.set(READER_SERVICE_NAME, serving if readers.ready(DEFAULT_READER) else not_serving)
        overall = serving if self.repository.ready(self.config.default_model) else not_serving
        self.health.set("", overall)
        self.health.set(SERVICE_NAME, overall)

    def start(self) -> None:
        """Load the repository, then listen (health says SERVING once the default model is ready)."""
        self.repository.scan()
        self.readers.scan()
        if not self.repository.ready(self.config.default_model):
            log.error("the default model %r is not ready: %s", self.config.default_model,
                      "; ".join(f"{v.name}/{v.version} {v.state} {v.reason}" for v in self.repository.versions()) or "repository empty")
        self.repository.start_polling(self.config.poll_seconds)
        self.readers.start_polling(self.config.poll_seconds)
        if self.config.metrics_port:
            self.metrics_port = self.metrics.serve(self.config.metrics_port)
        self.grpc.start()
        if self.http is not None:
            self.http.start()
        log.info("serving %s on port %d (HTTP gateway: %s; metrics: %s)", SERVICE_NAME, self.port,
                 f"port {self.http_port}" if self.http else "off", f"http port {self.metrics_port}" if self.metrics_port else "off")

    def stop(self, grace: float | None = None) -> None:
        """Drain: health NOT_SERVING, new RPCs refused, in-flight ones get `grace` seconds."""
        grace = self.config.grace_period if grace is None else grace
        log.info("shutting down: draining for up to %.0f s", grace)
        self.service.draining.set()
        self.health.enter_graceful_shutdown()
        # Both transports drain at once, each giving its in-flight requests up to `grace`.
        http_stopped = threading.Thread(target=self.http.stop, args=(grace,), name="http-drain") if self.http else None
        if http_stopped is not None:
            http_stopped.start()
        self.grpc.stop(grace).wait()
        if http_stopped is not None:
            http_stopped.join()
        self.repository.close(timeout=1.0)
        self.readers.close()
        self.metrics.stop()
        log.info("stopped")

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self.grpc.wait_for_termination(timeout)


def create_server(config: ServerConfig) -> tuple[TranslationServer, int]:
    server = TranslationServer(config)
    return server, server.port


def serve(config: ServerConfig) -> int:
    """Run until SIGTERM/SIGINT, then drain; SIGHUP rescans the model repository."""
    server, _port = create_server(config)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    def rescan(*_) -> None:
        server.repository.rescan_in_background()
        threading.Thread(target=server.readers.scan, name="reader-rescan", daemon=True).start()

    signal.signal(signal.SIGHUP, rescan)
    server.start()
    while not stop.wait(1.0):
        pass
    server.stop(config.grace_period)
    return 0
