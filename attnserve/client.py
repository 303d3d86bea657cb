"""Python client of the attnserve.v1.Translator service.

    with TranslatorClient("localhost:50051") as client:
        client.translate_text(["Open the file."])          # ['Ouvrir le fichier.']

Every call has a deadline (`timeout`, seconds). UNAVAILABLE (a replica restarting or draining,
a connection reset) is retried by gRPC's own retry policy, with exponential backoff; nothing
else is retried, since other errors would only repeat. Needs only grpcio and the generated
stubs: no model code.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from attnserve.v1 import translator_pb2 as pb
from attnserve.v1 import translator_pb2_grpc as pb_grpc

SERVICE = "attnserve.v1.Translator"


def retry_service_config(attempts: int) -> str:
    return json.dumps({"methodConfig": [{
        "name": [{"service": SERVICE}],
        "retryPolicy": {"maxAttempts": attempts, "initialBackoff": "0.1s", "maxBackoff": "2s",
                        "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]},
    }]})


class TranslatorClient:
    def __init__(self, target: str, token: str | None = None, tls: bool = False, root_certificates: bytes | None = None,
                 timeout: float = 30.0, attempts: int = 4, max_message_bytes: int = 64 * 1024 * 1024):
        """target: HOST:PORT (or any gRPC target, e.g. dns:///svc.ns:50051 with a headless
        Service for client-side round-robin). attempts: tries per call on UNAVAILABLE (gRPC caps it at 5)."""
        options = [("grpc.max_receive_message_length", max_message_bytes), ("grpc.lb_policy_name", "round_robin")]
        if attempts > 1:  # gRPC's retry policy needs at least 2 attempts
            options += [("grpc.enable_retries", 1), ("grpc.service_config", retry_service_config(attempts))]
        if tls:
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates), options)
        else:
            self.channel = grpc.insecure_channel(target, options)
        self.stub = pb_grpc.TranslatorStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout

    def translate(self, sentences: Sequence[str], model: str = "", version: str = "", *, beam_size: int = 0,
                  nbest: int = 0, length_penalty: float | None = None, max_length: int = 0,
                  return_alignment: bool = False, timeout: float | None = None) -> pb.TranslateResponse:
        options = pb.TranslationOptions(beam_size=beam_size, nbest=nbest, max_length=max_length,
                                        return_alignment=return_alignment)
        if length_penalty is not None:
            options.length_penalty = length_penalty
        request = pb.TranslateRequest(model=model, version=version, sentences=list(sentences), options=options)
        return self.stub.Translate(request, timeout=timeout or self.timeout, metadata=self.metadata)

    def translate_text(self, sentences: Sequence[str], model: str = "", **kwargs) -> list[str]:
        """The best translation of each sentence."""
        return [t.hypotheses[0].text for t in self.translate(sentences, model, **kwargs).translations]

    def translate_items(self, items: Sequence, model: str = "", version: str = "", *, glossary=None, beam_size: int = 0,
                        length_penalty: float | None = None, low_confidence: float | None = None) -> list:
        """attnserve.server.text TextItems through the server's text pipeline, one request per
        text format; TextResults in order (what the offline pipeline returns)."""
        from attnserve.server.text import SegmentResult, TextFormat, TextResult

        formats = {TextFormat.SENTENCE: pb.SENTENCE, TextFormat.DOCUMENT: pb.DOCUMENT, TextFormat.HTML: pb.HTML,
                   TextFormat.XML: pb.XML}
        entries = [pb.GlossaryEntry(source=e.source, target=e.target) for e in glossary.entries.values()] if glossary else []
        results: list = [None] * len(items)
        for text_format in dict.fromkeys(item.format for item in items):
            indexes = [i for i, item in enumerate(items) if item.format == text_format]
            options = pb.TranslationOptions(beam_size=beam_size, text_format=formats[text_format], glossary=entries)
            if length_penalty is not None:
                options.length_penalty = length_penalty
            if low_confidence is not None:
                options.low_confidence = low_confidence
            response = self.stub.Translate(pb.TranslateRequest(model=model, version=version, options=options,
                                                               sentences=[items[i].text for i in indexes]),
                                           timeout=self.timeout, metadata=self.metadata)
            for i, translation in zip(indexes, response.translations):
                segments = [SegmentResult(s.source, s.translation, s.confidence, list(s.flags)) for s in translation.segments]
                results[i] = TextResult(translation.hypotheses[0].text, translation.confidence, list(translation.flags),
                                        list(translation.placeholders), segments)
        return results

    def translate_stream(self, items: Iterable[tuple[str, str]], model: str = "", version: str = "", *,
                         beam_size: int = 0, timeout: float | None = None) -> Iterator[pb.TranslateStreamResponse]:
        """items: (id, sentence) pairs, consumed lazily; results come back as they are ready."""
        options = pb.TranslationOptions(beam_size=beam_size)
        requests = (pb.TranslateStreamRequest(id=item_id, sentence=sentence, model=model, version=version, options=options)
                    for item_id, sentence in items)
        return self.stub.TranslateStream(requests, timeout=timeout or self.timeout, metadata=self.metadata)

    def list_models(self) -> list[pb.ModelInfo]:
        return list(self.stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout, metadata=self.metadata).models)

    def get_model(self, name: str = "", version: str = "") -> pb.ModelInfo:
        return self.stub.GetModel(pb.GetModelRequest(name=name, version=version), timeout=self.timeout,
                                  metadata=self.metadata)

    def health(self, service: str = "") -> str:
        """SERVING, NOT_SERVING or SERVICE_UNKNOWN, as the standard health service says."""
        response = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def wait_until_serving(self, timeout: float = 60.0) -> None:
        """Block until the channel connects and the server reports SERVING."""
        grpc.channel_ready_future(self.channel).result(timeout=timeout)
        deadline = time.monotonic() + timeout
        while self.health() != "SERVING":
            if time.monotonic() > deadline:
                raise TimeoutError("the server did not become SERVING in time")
            time.sleep(0.1)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "TranslatorClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
