"""The HTTP/JSON gateway: the LibreTranslate API, a JSON mirror of attnserve.v1, health probes and
the playground, served from the same process and models as gRPC (`attnserve serve --http-port`).

    POST /translate            LibreTranslate: q (string or list), source (or auto), target,
    GET  /languages            format (text | html), alternatives, api_key; JSON or form data
    POST /detect               LibreTranslate: q; the served languages ranked (server/detect.py)
    GET  /frontend/settings
    POST /v1/translate         attnserve.v1.TranslateRequest in the proto3 JSON mapping
    GET  /v1/models            attnserve.v1.ListModelsResponse
    GET  /v1/models/{name}     attnserve.v1.ModelInfo (?version=)
    GET  /health, /health/live, /health/ready
    GET  /                     the playground (server/static/, shipped in the package)

Everything a request means goes through TranslationService (server/service.py): validation,
limits, client keys and rate limits, deadlines, metrics and the translation itself. This module
only reads and writes the wire format and maps the service's status codes to HTTP statuses;
errors are LibreTranslate's `{"error": "..."}` on every route. Starlette runs on uvicorn in a
thread of its own with its own event loop; each translation blocks one thread of a pool of
--workers threads (as each gRPC call holds one of gRPC's), so the event loop never waits on a model.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from concurrent import futures
from importlib import resources
from typing import Any

import grpc
import uvicorn
from google.protobuf import json_format
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from attnserve.v1 import translator_pb2 as pb
from attnserve.server.config import ServerConfig
from attnserve.server.detect import DetectedLanguage, LanguageDetector
from attnserve.server.errors import RequestError
from attnserve.server.service import TranslationService, _Call, bearer_credential

log = logging.getLogger(__name__)

# The service's status codes as HTTP statuses. NOT_FOUND is 404 on the native API; the
# LibreTranslate API answers every bad request with 400, as LibreTranslate does.
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.CANCELLED: 499,  # the client went away (nginx's convention); nobody reads it
}
# English names for /languages (LibreTranslate's `name`); other codes are listed by their code.
LANGUAGE_NAMES = {"en": "English", "fr": "French", "de": "German", "es": "Spanish", "it": "Italian", "pt": "Portuguese",
                  "nl": "Dutch", "pl": "Polish", "ru": "Russian", "uk": "Ukrainian", "cs": "Czech", "sv": "Swedish",
                  "da": "Danish", "fi": "Finnish", "nb": "Norwegian Bokmål", "ja": "Japanese", "zh": "Chinese",
                  "ko": "Korean", "ar": "Arabic", "tr": "Turkish", "el": "Greek", "hu": "Hungarian", "ro": "Romanian",
                  "ca": "Catalan", "eu": "Basque", "gl": "Galician"}
STATIC_FILES = {"/": ("playground.html", "text/html; charset=utf-8"),
                "/playground.js": ("playground.js", "text/javascript; charset=utf-8"),
                "/playground.css": ("playground.css", "text/css; charset=utf-8")}
JSON_TYPES = ("application/json",)


def language_name(code: str) -> str:
    return LANGUAGE_NAMES.get(code, code)


class HttpCallContext:
    """The service layer's CallContext for one HTTP request: its deadline, and the callbacks to
    run (cancel the scheduler job) when the client disconnects."""

    def __init__(self, deadline: float | None):
        self.deadline = deadline
        self._callbacks: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._active = True

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def add_callback(self, callback: Callable[[], None]) -> bool:
        with self._lock:
            if not self._active:
                return False
            self._callbacks.append(callback)
            return True

    def is_active(self) -> bool:
        return self._active

    def cancel(self) -> None:
        with self._lock:
            self._active, callbacks = False, self._callbacks
            self._callbacks = []
        for callback in callbacks:
            try:
                callback()
            except Exception:  # a callback of a finished job: nothing left to stop
                log.debug("cancel callback failed", exc_info=True)


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """Refuses request bodies over `limit` bytes (413) before the application reads them: by
    Content-Length when the client sends one, else by counting as the body arrives (chunked)."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await _send_json(send, 413, {"error": f"request body over the limit of {self.limit} bytes (max_message_bytes)"})
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise BodyTooLarge(f"request body over the limit of {self.limit} bytes (max_message_bytes)")
            return message

        await self.app(scope, limited_receive, send)


class ResponseMetrics:
    """attnserve_http_responses{route, status}: HTTP statuses, next to the service's per-call
    metrics (which carry the gRPC-style codes on the same labels as gRPC)."""

    def __init__(self, app: ASGIApp, gateway: "HttpGateway"):
        self.app, self.gateway = app, gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.gateway.service.metrics.http_responses.labels(route_of(scope["path"]), str(status[0])).inc()


def route_of(path: str) -> str:
    """The route template of a path (a bounded set of metric labels, never a client's string)."""
    if path.startswith("/v1/models/"):
        return "/v1/models/{name}"
    known = {"/translate", "/detect", "/languages", "/frontend/settings", "/v1/translate", "/v1/models", "/health",
             "/health/live", "/health/ready", *STATIC_FILES}
    return path if path in known else "other"


async def _send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": data})


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class HttpGateway:
    """The HTTP server: a Starlette app on uvicorn, listening from construction (so a taken port
    fails at startup, like gRPC's), serving from start() until stop() has drained it."""

    def __init__(self, service: TranslationService, config: ServerConfig):
        self.service, self.config = service, config
        self.executor = futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="http")
        # At most --workers requests in flight, as gRPC's maximum_concurrent_rpcs; beyond: 429.
        self._slots = threading.BoundedSemaphore(config.workers)
        self.detector = LanguageDetector()
        self.app = self._build_app()
        self.socket = _listen(config.host, config.http_port)
        self.port = self.socket.getsockname()[1]
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    # -- life ------------------------------------------------------------------------------------

    def start(self) -> None:
        uv_config = uvicorn.Config(
            self.app, lifespan="off", log_config=None, access_log=False, server_header=False, http="h11",
            ws="none", timeout_graceful_shutdown=self.config.grace_period,
            ssl_certfile=self.config.tls_cert or None, ssl_keyfile=self.config.tls_key or None,
            timeout_keep_alive=30)
        self._server = uvicorn.Server(uv_config)
        server = self._server
        self._thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[self.socket])),
                                        name="http-gateway", daemon=True)
        self._thread.start()
        # The language identifier's model takes ~1 s to load: load it now, not in a first request.
        threading.Thread(target=self.detector.known, name="langid-load", daemon=True).start()
        log.info("HTTP gateway on port %d", self.port)

    def stop(self, grace: float) -> None:
        """Stop listening, let in-flight requests finish (up to `grace` seconds), then stop.
        The service is draining already: requests that still arrive on open connections get 503."""
        if self._server is None:
            self.socket.close()
            return
        self._server.config.timeout_graceful_shutdown = grace
        self._server.should_exit = True
        self._thread.join(grace + 5.0)
        self.executor.shutdown(wait=True, cancel_futures=False)
        log.info("HTTP gateway stopped")

    # -- the app ---------------------------------------------------------------------------------

    def _build_app(self) -> ASGIApp:
        routes = [
            Route("/translate", self.libre_translate, methods=["POST"]),
            Route("/languages", self.libre_languages, methods=["GET", "POST"]),
            Route("/detect", self.libre_detect, methods=["POST"]),
            Route("/frontend/settings", self.libre_settings, methods=["GET"]),
            Route("/v1/translate", self.v1_translate, methods=["POST"]),
            Route("/v1/models", self.v1_models, methods=["GET"]),
            Route("/v1/models/{name:path}", self.v1_model, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/health/live", self.health, methods=["GET"]),
            Route("/health/ready", self.ready, methods=["GET"]),
            *[Route(path, self.static, methods=["GET"]) for path in STATIC_FILES],
        ]
        middleware = []
        origins = [o.strip() for o in self.config.http_cors_origins.split(",") if o.strip()]
        if origins:
            middleware.append(Middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                                         allow_headers=["Authorization", "Content-Type", "Request-Timeout"], max_age=86400))
        app = Starlette(routes=routes, middleware=middleware,
                        exception_handlers={HTTPException: self._http_exception, Exception: self._unexpected})
        return ResponseMetrics(BodyLimit(app, self.config.max_message_bytes), self)

    async def _http_exception(self, request: Request, exc: HTTPException) -> Response:
        messages = {404: f"no route {request.url.path!r} (see /v1/models, /translate, /languages)",
                    405: f"method {request.method} not allowed on {request.url.path}"}
        return error_response(exc.status_code, messages.get(exc.status_code, str(exc.detail)), exc.headers)

    async def _unexpected(self, request: Request, exc: Exception) -> Response:
        if isinstance(exc, BodyTooLarge):
            return error_response(413, str(exc))
        log.error("HTTP %s %s failed", request.method, request.url.path, exc_info=exc)
        return error_response(500, f"internal error: {type(exc).__name__}")

    # -- running a call --------------------------------------------------------------------------

    async def _call(self, request: Request, rpc: str, work: Callable[[HttpCallContext, _Call], Any],
                    libre: bool = False) -> Response:
        """Run `work` through the service layer's call (metrics, draining) in a worker thread;
        a client that disconnects meanwhile has its work cancelled. RequestError becomes an
        HTTP status with `{"error": ...}`."""
        refusal: RequestError | None = None
        try:
            context = HttpCallContext(self._deadline(request))
        except RequestError as exc:
            context, refusal = HttpCallContext(None), exc
        if not self._slots.acquire(blocking=False):
            refusal = RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"{self.config.workers} requests in flight (workers); retry later")
            return self._answer(self._refuse(rpc, context, refusal), libre)  # counted as a call, refused at once

        def run() -> Any:
            with self.service.call(rpc, context) as call:
                if refusal is not None:
                    raise refusal
                return work(context, call)

        try:
            future = asyncio.get_running_loop().run_in_executor(self.executor, run)
            while True:
                done, _ = await asyncio.wait({future}, timeout=0.25)
                if done:
                    break
                if await request.is_disconnected():
                    context.cancel()  # the job leaves the scheduler; the call ends CANCELLED
            try:
                outcome = future.result()
            except RequestError as exc:
                outcome = exc
            return self._answer(outcome, libre)
        finally:
            self._slots.release()

    def _refuse(self, rpc: str, context: HttpCallContext, refusal: RequestError) -> RequestError:
        try:
            with self.service.call(rpc, context):
                raise refusal
        except RequestError as exc:
            return exc

    def _answer(self, outcome: Any, libre: bool) -> Response:
        if isinstance(outcome, RequestError):
            return self._error(outcome, libre)
        if isinstance(outcome, Response):
            return outcome
        return JSONResponse(outcome)

    def _error(self, exc: RequestError, libre: bool) -> Response:
        status = HTTP_STATUS.get(exc.code, 500)
        message, headers = str(exc), {}
        if exc.code == grpc.StatusCode.UNAUTHENTICATED:
            if exc.reason == "bad_key":
                status = 403
                message = "Invalid API key" if libre else message
            elif libre:
                status, message = 400, "Please contact the server operator to get an API key"
            else:
                headers["WWW-Authenticate"] = "Bearer"
        elif exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            message = f"Slowdown: {message}" if libre else message
            headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after or 1)))
        elif libre and status == 404:
            status = 400
        return error_response(status, message, headers)

    def _deadline(self, request: Request) -> float | None:
        """The header Request-Timeout (seconds), else --http-timeout (0: none): HTTP has no
        deadline of its own, and no request should wait for ever."""
        header = request.headers.get("request-timeout")
        if header is not None:
            try:
                seconds = float(header)
            except ValueError:
                seconds = math.nan
            if not (math.isfinite(seconds) and seconds > 0):
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"Request-Timeout must be a positive number of seconds, got {header!r}")
            return time.monotonic() + min(seconds, 3600.0)
        return time.monotonic() + self.config.http_timeout if self.config.http_timeout else None

    async def _payload(self, request: Request, allow_form: bool) -> dict[str, Any] | RequestError:
        """The request's fields: a JSON object, or (LibreTranslate) form data. Bad bodies are a
        RequestError, raised inside the call so that the metrics count them."""
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        try:
            body = await request.body()
        except ClientDisconnect:
            return RequestError(grpc.StatusCode.CANCELLED, "client disconnected")
        if content_type in JSON_TYPES or (not content_type and body[:1] in (b"{", b"[")):
            try:
                payload = json.loads(body)
            except ValueError:  # includes bodies that are not UTF-8
                return RequestError(grpc.StatusCode.INVALID_ARGUMENT, "Invalid JSON format")
            if not isinstance(payload, dict):
                return RequestError(grpc.StatusCode.INVALID_ARGUMENT, "Invalid JSON format")
            return payload
        if allow_form and content_type in ("application/x-www-form-urlencoded", ""):
            try:
                text = body.decode("utf-8")
                return dict(urllib.parse.parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text), errors="strict",
                                                   max_num_fields=1000))
            except (UnicodeDecodeError, ValueError) as exc:
                return RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"Invalid form data: {exc}")
        if allow_form and content_type == "multipart/form-data":
            try:
                form = await request.form(max_files=0, max_fields=1000)
            except Exception as exc:  # python-multipart's parse errors, Starlette's limits
                return RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"Invalid form data: {exc}")
            return {key: value for key, value in form.items() if isinstance(value, str)}
        wanted = "JSON (Content-Type: application/json)" + (" or form data" if allow_form else "")
        return RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"unsupported Content-Type {content_type!r}: send {wanted}")

    def _credential(self, request: Request, payload: dict[str, Any] | RequestError | None = None) -> str:
        header = bearer_credential(request.headers.get("authorization", ""))
        if header:
            return header
        api_key = payload.get("api_key") if isinstance(payload, dict) else None
        return api_key if isinstance(api_key, str) else ""

    # -- the LibreTranslate API ------------------------------------------------------------------

    async def libre_translate(self, request: Request) -> Response:
        payload = await self._payload(request, allow_form=True)
        credential = self._credential(request, payload)
        from_form = not request.headers.get("content-type", "").lower().startswith("application/json")

        def work(context: HttpCallContext, call: _Call) -> dict[str, Any]:
            if isinstance(payload, RequestError):
                raise payload
            self.service.authorize(credential)
            return self._libre_translate(payload, from_form, context, call)

        return await self._call(request, "http.LibreTranslate", work, libre=True)

    def _libre_translate(self, payload: dict[str, Any], from_form: bool, context: HttpCallContext,
                         call: _Call) -> dict[str, Any]:
        """LibreTranslate's /translate (libretranslate/app.py), field by field."""
        def bad(message: str) -> RequestError:
            return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)

        q, source, target = payload.get("q"), payload.get("source"), payload.get("target")
        for name, value in (("q", q), ("source", source), ("target", target)):
            if not value:
                raise bad(f"Invalid request: missing {name} parameter")
        batch = isinstance(q, list)
        if not (isinstance(q, str) or (batch and all(isinstance(text, str) for text in q))):
            raise bad("Invalid request: q must be a string or a list of strings")
        for name, value in (("source", source), ("target", target)):
            if not isinstance(value, str):
                raise bad(f"Invalid request: {name} must be a string")
        text_format = payload.get("format") or "text"
        if text_format not in ("text", "html"):
            raise bad(f"{text_format} format is not supported")
        try:
            alternatives = max(0, int(payload.get("alternatives", 0) or 0))
        except (TypeError, ValueError):
            raise bad("Invalid request: alternatives parameter is not a number") from None
        alternatives_limit = self.config.max_beam_size - 1
        if alternatives > alternatives_limit:
            raise bad(f"Invalid request: alternatives parameter must be <= {alternatives_limit}")
        texts = list(q) if batch else [q]
        if from_form:  # as LibreTranslate: form data's CRLF line ends count as LF (RFC 2046)
            texts = ["\n".join(text.splitlines()) for text in texts]
        self.service.check_texts(texts)
        detected: DetectedLanguage | None = None
        if source == "auto":
            detected = self._detect_source(texts, target)
            source = detected.language
        model, source_code = self._pair(source, target)
        call.model = model
        options = pb.TranslationOptions(text_format=pb.HTML if text_format == "html" else pb.DOCUMENT)
        response = self.service.translate(pb.TranslateRequest(model=model, sentences=texts, options=options), context, call)
        translated = [t.hypotheses[0].text for t in response.translations]
        result: dict[str, Any] = {"translatedText": translated if batch else translated[0]}
        if detected is not None:
            # One detection for the whole request (the texts are translated from one source).
            shape = {"confidence": detected.confidence, "language": detected.language}
            result["detectedLanguage"] = [dict(shape) for _ in texts] if batch else shape
        if alternatives:
            found = [[] for _ in texts] if text_format == "html" else self._alternatives(
                model, texts, translated, response, alternatives, context, call)  # LibreTranslate: none for html
            result["alternatives"] = found if batch else found[0]
        return result

    def _alternatives(self, model: str, texts: list[str], translated: list[str], response: pb.TranslateResponse,
                      count: int, context: HttpCallContext, call: _Call) -> list[list[str]]:
        """The beam's other hypotheses for each text that is one sentence (a document's
        alternatives would be whole-document hypotheses, which the pipeline does not make)."""
        single = [i for i, t in enumerate(response.translations) if len(t.segments) <= 1 and texts[i].strip()]
        found: list[list[str]] = [[] for _ in texts]
        if not single:
            return found
        beam = max(self.config.default_beam_size, count + 1)
        options = pb.TranslationOptions(beam_size=beam, nbest=count + 1)
        try:
            nbest = self.service.translate(pb.TranslateRequest(model=model, sentences=[texts[i] for i in single],
                                                               options=options), context, call)
        except RequestError as exc:
            if exc.code != grpc.StatusCode.INVALID_ARGUMENT:
                raise
            return found  # a sentence too long for a raw translation: the pipeline split it; no alternatives
        for i, translation in zip(single, nbest.translations):
            unique: list[str] = []
            for hypothesis in translation.hypotheses:
                if hypothesis.text != translated[i] and hypothesis.text not in unique:
                    unique.append(hypothesis.text)
            found[i] = unique[:count]
        return found

    def _detect_source(self, texts: list[str], target: str) -> DetectedLanguage:
        """`source: "auto"`: the served language the texts are most likely in, among those that
        translate into `target`; its confidence is its share among all served languages, so a
        text that looks like the target language comes back with a low one."""
        pairs = self._pairs()
        sources = sorted({s for s, t in pairs if t == target})
        if not sources:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"{target} is not supported")
        served = sorted({s for s, _ in pairs} | {t for _, t in pairs})
        ranked = self.detector.rank("\n".join(texts)[:2000], served)
        for candidate in ranked:
            if candidate.language in sources:
                return candidate
        if len(sources) == 1:  # a language langid does not know: the only possible source
            return DetectedLanguage(sources[0], 100.0 if len(served) == 1 else 0.0)
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"auto: cannot tell which of {sources} the text is in; name the source language")

    async def libre_detect(self, request: Request) -> Response:
        """LibreTranslate's /detect: `[{"confidence": 0-100, "language": code}, ...]`, best
        first, over the languages this server translates from or into."""
        payload = await self._payload(request, allow_form=True)
        credential = self._credential(request, payload)

        def work(context: HttpCallContext, call: _Call) -> list[dict[str, Any]]:
            if isinstance(payload, RequestError):
                raise payload
            self.service.authorize(credential)
            q = payload.get("q")
            if not q:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "Invalid request: missing q parameter")
            if not isinstance(q, str):
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "Invalid request: q must be a string")
            self.service.check_texts([q])
            pairs = self._pairs()
            served = sorted({s for s, _ in pairs} | {t for _, t in pairs})
            return [{"confidence": d.confidence, "language": d.language} for d in self.detector.rank(q, served)]

        return await self._call(request, "http.Detect", work, libre=True)

    def _pairs(self) -> dict[tuple[str, str], str]:
        """(source, target) -> the model serving it: ready models only, the default one first."""
        pairs: dict[tuple[str, str], str] = {}
        models = self.service.list_models().models
        for info in sorted(models, key=lambda m: not m.is_default):
            if info.state == pb.ModelInfo.READY and info.source_language and info.target_language:
                pairs.setdefault((info.source_language, info.target_language), info.name)
        return pairs

    def _pair(self, source: str, target: str) -> tuple[str, str]:
        pairs = self._pairs()
        sources = sorted({s for s, _ in pairs})
        languages = sources + sorted({t for _, t in pairs} - set(sources))
        if source not in languages:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"{source} is not supported")
        if target not in languages:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"{target} is not supported")
        if (source, target) not in pairs:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"{language_name(target)} ({target}) is not available as a target language from "
                               f"{language_name(source)} ({source})")
        return pairs[(source, target)], source

    async def libre_languages(self, request: Request) -> Response:
        def work(context: HttpCallContext, call: _Call) -> list[dict[str, Any]]:
            pairs = self._pairs()
            codes = sorted({s for s, _ in pairs} | {t for _, t in pairs})
            return [{"code": code, "name": language_name(code), "targets": sorted(t for s, t in pairs if s == code)}
                    for code in codes]

        return await self._call(request, "http.Languages", work, libre=True)

    async def libre_settings(self, request: Request) -> Response:
        def work(context: HttpCallContext, call: _Call) -> dict[str, Any]:
            pairs = self._pairs()
            default = next(((s, t) for (s, t), name in pairs.items() if name == self.config.default_model),
                           next(iter(pairs), ("en", "en")))
            return {"charLimit": self.config.max_characters_per_request, "frontendTimeout": 500,
                    "apiKeys": self.service.keys.required, "keyRequired": self.service.keys.required,
                    "suggestions": False, "filesTranslation": False, "supportedFilesFormat": [],
                    "language": {"source": {"code": default[0], "name": language_name(default[0])},
                                 "target": {"code": default[1], "name": language_name(default[1])}}}

        return await self._call(request, "http.FrontendSettings", work, libre=True)

    # -- the native JSON API ---------------------------------------------------------------------

    async def v1_translate(self, request: Request) -> Response:
        payload = await self._payload(request, allow_form=False)
        credential = self._credential(request)

        def work(context: HttpCallContext, call: _Call) -> dict[str, Any]:
            if isinstance(payload, RequestError):
                raise payload
            self.service.authorize(credential)
            message = pb.TranslateRequest()
            try:
                json_format.ParseDict(payload, message)
            except (json_format.ParseError, ValueError, TypeError) as exc:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"invalid TranslateRequest: {exc}") from None
            return json_format.MessageToDict(self.service.translate(message, context, call))

        return await self._call(request, "http.Translate", work)

    async def v1_models(self, request: Request) -> Response:
        credential = self._credential(request)

        def work(context: HttpCallContext, call: _Call) -> dict[str, Any]:
            self.service.authorize(credential)
            return json_format.MessageToDict(self.service.list_models())

        return await self._call(request, "http.ListModels", work)

    async def v1_model(self, request: Request) -> Response:
        credential = self._credential(request)
        get = pb.GetModelRequest(name=request.path_params["name"], version=request.query_params.get("version", ""))

        def work(context: HttpCallContext, call: _Call) -> dict[str, Any]:
            self.service.authorize(credential)
            return json_format.MessageToDict(self.service.get_model(get, call))

        return await self._call(request, "http.GetModel", work)

    # -- probes and the playground ---------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        """Liveness (and LibreTranslate's /health): the process answers."""
        return JSONResponse({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        """Readiness: the default model (or ?model=) is ready and the server is not draining:
        the same state the gRPC health service reports."""
        model = request.query_params.get("model", "")
        if model and model not in self.service.repository.model_names():
            return error_response(404, f"no model {model!r} in the repository")
        if self.service.ready(model):
            return JSONResponse({"status": "SERVING"})
        reason = "draining" if self.service.draining.is_set() else "model not ready"
        return JSONResponse({"status": "NOT_SERVING", "error": reason}, status_code=503)

    async def static(self, request: Request) -> Response:
        name, media_type = STATIC_FILES[request.url.path]
        data = resources.files("attnserve.server").joinpath("static", name).read_bytes()
        return Response(data, media_type=media_type, headers={
            "Cache-Control": "no-cache",
            # Everything the page needs is same-origin: no CDN, no inline script.
            "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self'",
            "X-Content-Type-Options": "nosniff"})


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port ("[::]" is dual-stack IPv6 + IPv4, as for gRPC)."""
    address = host.strip("[]") or "::"
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and
    # accepted sockets inherit proto 0 from socket(family, SOCK_STREAM). Without it, uvicorn's
    # separate header and body writes meet Nagle and delayed ACKs: +40 ms on every response.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart while old sockets linger in TIME_WAIT
    if family == socket.AF_INET6:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    try:
        sock.bind((address, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} (HTTP): {exc}") from exc
    sock.set_inheritable(True)
    return sock
