"""Load benchmark of the gRPC server (and its HTTP/JSON gateway) against the offline engine, on
the same sentences.

    attnserve bench-load --clients 1 8 32 --sentences 400
    attnserve bench-load --transports grpc http --modes on      # gRPC next to HTTP /v1/translate

C concurrent clients (each its own channel, one sentence per request, the next request as soon
as the answer comes: a closed loop) against `attnserve serve` in a subprocess, with batching on
(the defaults) and off (--max-batch-sentences 1), and optionally against the scheduler in this
process without gRPC (--modes scheduler); the offline engine translates the same sentences in
length-sorted batches in this process, with the same threads and beam. Prints a
Markdown table and writes JSON; ratios are computed within this one run.

The clients run in this process on grpc.aio (one thread, no per-client threads), so on a small
machine they share its cores with the server: the numbers are for the whole box. Over HTTP
(--transports http) each client keeps one HTTP/1.1 connection alive and POSTs the same request
to /v1/translate as JSON, on a minimal asyncio client (no client library's overhead measured).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from attnserve.client import TranslatorClient
from attnserve.v1 import translator_pb2 as pb
from attnserve.v1 import translator_pb2_grpc as pb_grpc
from attnserve.server.bundle import load_bundle
from attnserve.server.config import SHIPPED_REPOSITORY
from attnserve.server.engine import Engine, TranslationOptions

log = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class Refused(Exception):
    """The server turned a request away for load (gRPC RESOURCE_EXHAUSTED, HTTP 429): it is
    sent again, as a client with a retry policy would."""


# How long a refused client waits before it sends the same sentence again.
RETRY_AFTER_S = 0.005


async def _closed_loop(sentences: list[str], translators: list[Callable[[str], Awaitable[None]]]) -> dict[str, Any]:
    """One client per translator; each takes the next sentence from a shared list until none is
    left, sending the next as soon as the answer comes. A refused request is sent again after
    RETRY_AFTER_S, and its latency counts from the first try. One row: throughput, latencies
    and how many tries were refused."""
    next_index = 0
    latencies: list[float] = []
    refused = 0

    async def client(translate: Callable[[str], Awaitable[None]]) -> None:
        nonlocal next_index, refused
        while next_index < len(sentences):
            sentence = sentences[next_index]
            next_index += 1
            started = time.perf_counter()
            while True:
                try:
                    await translate(sentence)
                    break
                except Refused:
                    refused += 1
                    await asyncio.sleep(RETRY_AFTER_S)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(client(translate) for translate in translators))
    elapsed = time.perf_counter() - started
    return {"clients": len(translators), "sentences": len(sentences), "seconds": round(elapsed, 3),
            "sentences_per_s": round(len(sentences) / elapsed, 2),
            "p50_ms": round(1000 * statistics.median(latencies), 1), "p99_ms": round(1000 * _percentile(latencies, 0.99), 1),
            "refused": refused}


async def _drive(port: int, sentences: list[str], clients: int, beam: int) -> dict[str, Any]:
    """The closed loop over gRPC: each client its own channel, Translate with one sentence."""
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(clients)]

    def translator(stub: pb_grpc.TranslatorStub) -> Callable[[str], Awaitable[None]]:
        async def translate(sentence: str) -> None:
            try:
                await stub.Translate(pb.TranslateRequest(sentences=[sentence], options=pb.TranslationOptions(beam_size=beam)),
                                     timeout=120)
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:  # more clients than --workers
                    raise Refused(error.details()) from error
                raise
        return translate

    try:
        return await _closed_loop(sentences, [translator(pb_grpc.TranslatorStub(channel)) for channel in channels])
    finally:
        for channel in channels:
            await channel.close()


class _HttpClient:
    """One keep-alive HTTP/1.1 connection POSTing /v1/translate; it connects on its first
    request, as a gRPC channel does."""

    def __init__(self, port: int, beam: int):
        self.port, self.beam = port, beam
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def translate(self, sentence: str) -> None:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        reader, writer = self.reader, self.writer
        body = json.dumps({"sentences": [sentence], "options": {"beamSize": self.beam}}).encode()
        writer.write(b"POST /v1/translate HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        status = (await reader.readline()).split(b" ", 2)
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        answer = await reader.readexactly(length)
        if status[1] == b"429":
            raise Refused(answer[:200].decode(errors="replace"))
        if status[1] != b"200":
            raise RuntimeError(f"HTTP {status[1].decode()}: {answer[:200]!r}")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def _drive_http(port: int, sentences: list[str], clients: int, beam: int) -> dict[str, Any]:
    """The closed loop over HTTP: each client one keep-alive connection, POST /v1/translate."""
    http_clients = [_HttpClient(port, beam) for _ in range(clients)]
    try:
        return await _closed_loop(sentences, [c.translate for c in http_clients])
    finally:
        for c in http_clients:
            c.close()


def run_server(mode: str, repository: Path, threads: int, sentences: list[str], clients: list[int], beam: int,
               warmup: int, transport: str = "grpc") -> list[dict[str, Any]]:
    port, http_port = _free_port(), _free_port()
    command = [sys.executable, "-m", "attnserve.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--metrics-port", "0", "--threads", str(threads), "--model-repository", str(repository),
               "--default-beam-size", str(beam), "--poll-seconds", "0", "--log-level", "WARNING"]
    if transport == "http":
        command += ["--http-port", str(http_port), "--http-timeout", "0"]
    if mode == "off":
        command += ["--max-batch-sentences", "1"]
    process = subprocess.Popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def drive(batch: list[str], count: int) -> dict[str, Any]:
        if transport == "http":
            return asyncio.run(_drive_http(http_port, batch, count, beam))
        return asyncio.run(_drive(port, batch, count, beam))

    try:
        with TranslatorClient(f"127.0.0.1:{port}") as client:
            client.wait_until_serving(120)
        drive(sentences[:warmup], max(clients))  # warm-up
        rows = []
        for count in clients:
            row = drive(sentences, count)
            row["mode"] = f"server, batching {mode}"
            row["transport"] = transport
            log.info("%s", row)
            rows.append(row)
        return rows
    finally:
        process.terminate()
        process.wait(60)


def run_scheduler(repository: Path, model: str, threads: int, sentences: list[str], clients: list[int],
                  beam: int) -> list[dict[str, Any]]:
    """The same closed loop against the scheduler in this process, without gRPC: what batching
    itself achieves, and so what the RPC layer costs."""
    import threading

    from attnserve.server.repository import EngineConfig
    from attnserve.server.scheduler import BatchingConfig, Job, SchedulerGroup

    instances, per_instance = EngineConfig(threads=threads).layout(on_cuda=False)  # as the server does
    engines = [_engine(repository, model, per_instance) for _ in range(instances)]
    sources = engines[0].encode_texts(sentences)
    opts = TranslationOptions(beam_size=beam)
    rows = []
    for count in clients:
        scheduler = SchedulerGroup(engines, model, BatchingConfig())
        next_index, lock, latencies = [0], threading.Lock(), []

        def client() -> None:
            while True:
                with lock:
                    if next_index[0] >= len(sources):
                        return
                    index = next_index[0]
                    next_index[0] += 1
                started = time.perf_counter()
                job = Job([sources[index]], opts)
                scheduler.submit(job)
                job.wait()
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        workers = [threading.Thread(target=client) for _ in range(count)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        elapsed = time.perf_counter() - started
        scheduler.close()
        row = {"mode": "scheduler in-process, no gRPC", "clients": count, "sentences": len(sources),
               "seconds": round(elapsed, 3), "sentences_per_s": round(len(sources) / elapsed, 2),
               "p50_ms": round(1000 * statistics.median(latencies), 1), "p99_ms": round(1000 * _percentile(latencies, 0.99), 1)}
        log.info("%s", row)
        rows.append(row)
    return rows


def _engine(repository: Path, model: str, threads: int, spin_step: bool = False) -> Engine:
    versions = sorted((p for p in (repository / model).iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    return Engine(load_bundle(versions[-1]), "fp32", device="cpu", threads=threads, spin_step=spin_step)


OFFLINE_BATCHES = (16, 32, 64)  # sentences per batch searched for the offline engine's best


def run_offline(repository: Path, model: str, threads: int, sentences: list[str], beam: int) -> dict[str, Any]:
    """The offline engine at its best on these sentences: length-sorted batches of each size in
    OFFLINE_BATCHES, with and (on more than one thread) without the step workers spinning; the
    fastest is the reference, with its setting, and every try is kept in the row."""
    opts = TranslationOptions(beam_size=beam)
    tries = []
    for spin_step in ((False, True) if threads > 1 else (False,)):
        engine = _engine(repository, model, threads, spin_step=spin_step)
        try:
            engine.translate(sentences[:32], opts)  # warm-up
            for batch in OFFLINE_BATCHES:
                started = time.perf_counter()
                # the token bound allows `batch` sentences of any length: the sentence count decides
                engine.translate(sentences, opts, max_batch_sentences=batch,
                                 max_batch_tokens=batch * (engine.max_source_tokens + 1))
                elapsed = time.perf_counter() - started
                tries.append({"batch": batch, "spin_step": spin_step, "seconds": round(elapsed, 3),
                              "sentences_per_s": round(len(sentences) / elapsed, 2)})
                log.info("offline: %s", tries[-1])
        finally:
            engine.close()
    best = max(tries, key=lambda t: t["sentences_per_s"])
    setting = f"batches of {best['batch']}, length-sorted" + (", step spinning" if best["spin_step"] else "")
    return {"mode": f"offline engine at its best ({setting})", "clients": 0, "sentences": len(sentences),
            "seconds": best["seconds"], "sentences_per_s": best["sentences_per_s"], "p50_ms": None, "p99_ms": None,
            "setting": {"batch": best["batch"], "spin_step": best["spin_step"]}, "tries": tries}


def _machine() -> dict[str, Any]:
    """The CPU model and flags (every measurement names its hardware); /proc/cpuinfo where there is one."""
    try:
        from attnserve.model.hardware import cpu_info  # imports torch: only this report needs it
    except ImportError:  # a serving-only install
        return {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()}
    info = cpu_info()
    return {"cpus": os.cpu_count(), "processor": info["model"], "flags": info["flags"]}


def _median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median throughput (its latencies with it)."""
    ordered = sorted(rows, key=lambda r: r["sentences_per_s"])
    return {**ordered[len(ordered) // 2], "runs_sentences_per_s": [r["sentences_per_s"] for r in rows]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="attnserve bench-load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=SHIPPED_REPOSITORY)
    parser.add_argument("--model", default="en-fr")
    parser.add_argument("--data", type=Path, default=Path("data/en-fr/test.tsv"), help="source<TAB>reference lines")
    parser.add_argument("--sentences", type=int, default=400)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="onnxruntime threads (server and offline)")
    parser.add_argument("--modes", nargs="+", default=["on", "off"], choices=["on", "off", "scheduler"],
                        help="on/off: the server with batching on/off; scheduler: batching in-process, no gRPC")
    parser.add_argument("--transports", nargs="+", default=["grpc"], choices=["grpc", "http"],
                        help="server transports: gRPC Translate, and/or HTTP POST /v1/translate (JSON)")
    parser.add_argument("--repeat", type=int, default=3, help="run everything this many times; report the median "
                        "of each row (these machines are noisy)")
    parser.add_argument("--out", type=Path, default=Path("build/bench-load.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.data.is_file():
        log.error("%s not found: build the corpus first (attnserve data build --out data/en-fr)", args.data)
        return 2
    sentences = [line.split("\t")[0] for line in args.data.read_text().splitlines()[: args.sentences]]
    runs: list[list[dict[str, Any]]] = []
    for repeat in range(args.repeat):
        rows = [run_offline(args.repository, args.model, args.threads, sentences, args.beam)]
        log.info("%s", rows[0])
        for mode in args.modes:
            if mode == "scheduler":
                rows += run_scheduler(args.repository, args.model, args.threads, sentences, args.clients, args.beam)
            else:
                for transport in args.transports:
                    rows += run_server(mode, args.repository, args.threads, sentences, args.clients, args.beam, warmup=64,
                                       transport=transport)
        runs.append(rows)
    rows = [_median_row([run[i] for run in runs]) for i in range(len(runs[0]))]
    offline = rows[0]["sentences_per_s"]
    by_key = {(r["mode"], r.get("transport", ""), r["clients"]): r for r in rows}
    lines = ["| mode | transport | clients | sentences/s | p50 ms | p99 ms | vs offline | vs batching off | tries refused |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        off = by_key.get(("server, batching off", r.get("transport", ""), r["clients"]))
        vs_off = f"{r['sentences_per_s'] / off['sentences_per_s']:.2f}x" if off and r["clients"] else ""
        lines.append(f"| {r['mode']} | {r.get('transport', '-')} | {r['clients'] or '-'} | {r['sentences_per_s']} | {r['p50_ms'] or '-'} | "
                     f"{r['p99_ms'] or '-'} | {r['sentences_per_s'] / offline:.0%} | {vs_off} | {r.get('refused', '-')} |")
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": "attnserve bench-load " + " ".join(argv if argv is not None else sys.argv[2:]),
                                    "machine": _machine(),
                                    "beam": args.beam, "threads": args.threads, "rows": rows, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
