"""Prometheus metrics of one server, in a registry of its own (several servers can live in one
process, as in the tests), served in the text format on their own HTTP port.

Histograms, not summaries, so that Prometheus can aggregate quantiles across replicas.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RUN_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TOKEN_BUCKETS = (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("attnserve_requests", "RPCs answered, by RPC, model and status code",
                                ["rpc", "model", "code"], registry=r)
        self.request_latency = Histogram("attnserve_request_latency_seconds", "RPC latency, from arrival to answer",
                                         ["rpc"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("attnserve_queue_time_seconds", "time a sentence waited before joining a batch",
                                    ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.run_time = Histogram("attnserve_onnxruntime_run_seconds", "onnxruntime session run time, per graph",
                                  ["model", "graph"], buckets=RUN_BUCKETS, registry=r)
        self.batch_sentences = Histogram("attnserve_batch_sentences", "sentences in a decoder step's batch",
                                         ["model"], buckets=SIZE_BUCKETS, registry=r)
        self.batch_tokens = Histogram("attnserve_batch_tokens", "padded source tokens (times beam) in a decoder step's batch",
                                      ["model"], buckets=TOKEN_BUCKETS, registry=r)
        self.sentences = Counter("attnserve_sentences", "sentences translated", ["model"], registry=r)
        self.generated_tokens = Counter("attnserve_generated_tokens", "target tokens generated (best hypotheses)",
                                        ["model"], registry=r)
        self.http_responses = Counter("attnserve_http_responses", "HTTP gateway responses, by route and HTTP status",
                                      ["route", "status"], registry=r)
        self.inflight = Gauge("attnserve_inflight_requests", "RPCs being handled", registry=r)
        self.queue_depth = Gauge("attnserve_queue_depth", "sentences waiting for a batch", ["model"], registry=r)
        self.model_info = Gauge("attnserve_model_info", "1 for each model version being served",
                                ["model", "version", "precision", "provider"], registry=r)
        self.load_failures = Counter("attnserve_model_load_failures", "model versions refused (verification, loading or warm-up)",
                                     ["model"], registry=r)
        r.register(GpuCollector())
        self._http = None

    def run_observer(self, model: str) -> Callable[[str, float], None]:
        """An engine's run observer (Engine(run_observer=...)): onnxruntime run times of `model`."""
        run_time = self.run_time
        return lambda graph, seconds: run_time.labels(model, graph).observe(seconds)

    def serve(self, port: int, host: str = "") -> int:
        """Start the /metrics HTTP server; returns its port."""
        server, _thread = start_http_server(port, addr=host or "0.0.0.0", registry=self.registry)
        self._http = server
        return server.server_port

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class GpuCollector:
    """GPU memory and utilisation through NVML, on machines that have an NVIDIA GPU and the
    nvidia-ml-py package; nothing elsewhere."""

    def __init__(self) -> None:
        self.nvml = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
        except Exception:  # no library, no driver or no GPU: no GPU metrics
            log.debug("no NVML: GPU metrics off")

    def collect(self):
        if self.nvml is None:
            return
        nvml = self.nvml
        used = GaugeMetricFamily("attnserve_gpu_memory_used_bytes", "GPU memory in use", labels=["gpu"])
        total = GaugeMetricFamily("attnserve_gpu_memory_total_bytes", "GPU memory", labels=["gpu"])
        utilisation = GaugeMetricFamily("attnserve_gpu_utilization_ratio", "share of time the GPU was busy", labels=["gpu"])
        try:
            for i in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(i)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                used.add_metric([str(i)], memory.used)
                total.add_metric([str(i)], memory.total)
                utilisation.add_metric([str(i)], nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
        except Exception as exc:  # a scrape must never fail because of the GPU
            log.warning("NVML query failed: %s", exc)
            return
        yield from (used, total, utilisation)
