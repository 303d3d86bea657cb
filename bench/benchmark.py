"""Side-by-side decoding benchmark on the same weights and the same test sentences.

    torch        the reference: eager torch with its key/value cache, same length-sorted batches
    onnx-fp32    this project's engine on onnxruntime, fp32 graphs
    onnx-int8    the same, dynamically quantised int8 graphs
    ct2-float32  CTranslate2 with the same weights converted through its TransformerSpec API
    ct2-int8     CTranslate2 int8

Every configuration runs in its own subprocess (so peak memory is its own, and CTranslate2
reads its CT2_USE_MKL afresh) on the same sentences, sorted by length and cut into batches of B
sentences, after a warm-up. Each engine is measured in every setting asked for (--threads,
--instances, and --ct2-mkl for CTranslate2), and the orchestrator prints a Markdown table of
each engine at its best setting, with that setting and the ratios between bests, all within
this one run.

Instances: N decoders of T threads each take the batches from one queue, N at a time, on N
Python threads: the parallel-batch layout of a throughput job. For CTranslate2 that is its own
mechanism, one Translator with inter_threads=N and intra_threads=T called from N threads; for
this engine, N Engines (as the server's --instances); for torch, N copies of the model with
torch's T intra-op threads. Only layouts with N x T within the largest --threads are measured,
so every layout uses the same cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

ENGINES = ("torch", "onnx-fp32", "onnx-int8", "ct2-float32", "ct2-int8")


def _batches(sources: list[list[int]], size: int) -> list[list[int]]:
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    return [order[i : i + size] for i in range(0, len(order), size)]


def make_decoder(engine: str, run_dir: Path, bundle_dir: Path, workdir: Path, threads: int, beam: int,
                 spin_step: bool = False, inter_threads: int = 1):
    """A function: list of source id lists (ending in EOS) -> list of target id lists."""
    if engine == "torch":
        import torch

        from attnserve.model.batching import pad
        from attnserve.model.checkpoint import load_model
        from attnserve.model.decode import DecodeOptions, decode

        torch.set_num_threads(threads)
        model, _, _ = load_model(run_dir)
        opts = DecodeOptions(beam_size=beam)
        return lambda batch: [h[0].tokens for h in decode(model, pad(batch), opts)]
    if engine.startswith("onnx-"):
        from attnserve.server.bundle import load_bundle
        from attnserve.server.engine import Engine, TranslationOptions

        onnx_engine = Engine(load_bundle(bundle_dir), engine.split("-")[1], device="cpu", threads=threads,
                             spin_step=spin_step)
        opts = TranslationOptions(beam_size=beam)
        return lambda batch: [h[0].tokens for h in onnx_engine.translate_ids(
            batch, opts, max_batch_tokens=1 << 30, max_batch_sentences=len(batch))]
    if engine.startswith("ct2-"):
        from attnserve.bench import ct2
        from attnserve.model.checkpoint import read_config

        compute_type = engine.split("-")[1]
        model_dir = workdir / "ct2-model"
        if not (model_dir / "model.bin").exists():
            ct2.convert(run_dir, model_dir)
        if compute_type == "int8":
            model_dir = workdir / "ct2-model-int8"
            if not (model_dir / "model.bin").exists():
                ct2.convert(run_dir, model_dir, quantization="int8")
        translator = ct2.load_translator(model_dir, compute_type=compute_type, intra_threads=threads,
                                         inter_threads=inter_threads)
        vocab = ct2.read_vocabulary(model_dir)
        max_len = read_config(run_dir).model.max_len
        # Timed in CTranslate2's own fastest mode (one call per batch, no per-step callback);
        # ct2.translate, the token-exact variant, is what bench/ct2.py's parity check uses.
        # Source ids go without EOS: CTranslate2's wrapper appends it.
        return lambda batch: ct2.translate_ids_native(translator, [ids[:-1] for ids in batch], vocab, beam_size=beam,
                                                      max_len=max_len)
    raise ValueError(f"unknown engine {engine!r}; choose from {ENGINES}")


def measure(engine: str, run_dir: Path, bundle_dir: Path, split: Path, sentences: int, beam: int, batch: int,
            threads: int, workdir: Path, spin_step: bool = False, instances: int = 1) -> dict[str, Any]:
    """Decode the sentences with one engine configuration and time it (in this process):
    `instances` decoders of `threads` threads each take the batches from one queue."""
    import sacrebleu
    import sentencepiece as spm

    from attnserve.model.corpus import load_tsv

    rows = load_tsv(split)[:sentences]
    sp = spm.SentencePieceProcessor(model_file=str(run_dir / "spm.model"))
    sources = [ids[:255] + [3] for ids in sp.encode([s for s, _ in rows])]
    if engine.startswith("ct2-"):  # CTranslate2's own parallel batches: one Translator, inter_threads workers
        decoders = [make_decoder(engine, run_dir, bundle_dir, workdir, threads, beam, inter_threads=instances)] * instances
    else:
        decoders = [make_decoder(engine, run_dir, bundle_dir, workdir, threads, beam, spin_step) for _ in range(instances)]
    for decoder in set(decoders):
        decoder(sources[:8])  # warm-up: allocations, lazy initialisation
    outputs: list[list[int]] = [[] for _ in sources]
    latencies: list[float] = []  # seconds per batch: at batch 1, a request's latency
    pending = iter(_batches(sources, batch))  # shared by the instances; next() under the lock
    lock = threading.Lock()

    def work(decoder) -> None:
        while True:
            with lock:
                group = next(pending, None)
            if group is None:
                return
            batch_start = time.perf_counter()
            for i, tokens in zip(group, decoder([sources[i] for i in group])):
                outputs[i] = tokens
            latencies.append(time.perf_counter() - batch_start)

    start = time.perf_counter()
    if instances == 1:
        work(decoders[0])
    else:
        workers = [threading.Thread(target=work, args=(decoder,)) for decoder in decoders]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    seconds = time.perf_counter() - start
    hypotheses = sp.decode(outputs)
    target_tokens = sum(len(t) + 1 for t in outputs)  # with EOS, as every engine generates it
    return {
        "engine": engine, "beam": beam, "batch": batch, "sentences": len(rows), "threads": threads,
        "spin_step": spin_step, "instances": instances,
        "seconds": round(seconds, 3), "target_tokens": target_tokens,
        "tokens_per_s": round(target_tokens / seconds, 1), "sentences_per_s": round(len(rows) / seconds, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "bleu": round(sacrebleu.corpus_bleu(hypotheses, [[t for _, t in rows]]).score, 2),
        "batch_p50_ms": round(float(np.percentile(latencies, 50)) * 1e3, 2),
        "batch_p99_ms": round(float(np.percentile(latencies, 99)) * 1e3, 2),
    }


def settings(engine: str, threads: list[int], ct2_mkl: list[str], instances: Sequence[int] = (1,)) -> list[dict[str, Any]]:
    """The settings an engine is measured in: every thread count; for CTranslate2 every
    CT2_USE_MKL value asked for ("" leaves the environment's, CTranslate2's default); for this
    engine with more than one thread, its step session's workers sleeping or spinning between
    runs (runtime.OnnxRuntime's spin_step). With more than one instance, the thread count is
    each instance's, and only layouts within the largest thread count (the cores) are kept."""
    cores = max(threads)
    layouts = [(n, t) for n in sorted(set(instances)) for t in threads if n * t <= cores]
    if engine.startswith("ct2"):
        return [{"threads": t, "instances": n, "ct2_use_mkl": mkl, "spin_step": False}
                for n, t in layouts for mkl in ct2_mkl]
    spins = [False, True] if engine.startswith("onnx") else [False]
    return [{"threads": t, "instances": n, "ct2_use_mkl": "", "spin_step": spin} for n, t in layouts for spin in spins
            if t > 1 or not spin]


def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    for beam in args.beams:
        for batch in args.batches:
            for engine in args.engines:
                for setting in settings(engine, args.threads, args.ct2_mkl, args.instances):
                    command = [sys.executable, "-m", "attnserve.bench.benchmark", "--one", engine, "--run",
                               str(args.run), "--bundle", str(args.bundle), "--split", str(args.split), "--sentences",
                               str(args.sentences), "--beams", str(beam), "--batches", str(batch), "--threads",
                               str(setting["threads"]), "--instances", str(setting["instances"]),
                               "--workdir", str(args.workdir)]
                    if setting["spin_step"]:
                        command.append("--spin-step")
                    env = dict(os.environ)
                    if setting["ct2_use_mkl"]:  # read by CTranslate2 at import: one process per value
                        env["CT2_USE_MKL"] = setting["ct2_use_mkl"]
                    done = subprocess.run(command, capture_output=True, text=True, env=env)
                    if done.returncode != 0:
                        log.error("%s beam %d batch %d %s failed:\n%s", engine, beam, batch, setting, done.stderr[-2000:])
                        continue
                    result = {**json.loads(done.stdout.strip().splitlines()[-1]),
                              "ct2_use_mkl": setting["ct2_use_mkl"] or os.environ.get("CT2_USE_MKL", "")}
                    log.info("%s", result)
                    results.append(result)
    return results


def setting_of(result: dict[str, Any]) -> str:
    ct2 = result["engine"].startswith("ct2")
    text = f"{result['threads']} thread{'s' if result['threads'] != 1 else ''}"
    if result.get("instances", 1) > 1:  # runs written before instances were searched have none
        text = f"{result['instances']} instances x {text}" + (" (inter_threads)" if ct2 else "")
    if ct2:
        text += f", CT2_USE_MKL={result.get('ct2_use_mkl') or 'default'}"
    if result.get("spin_step"):
        text += ", step spinning"
    return text


def best_of(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each (engine, beam, batch) at its best setting: the highest sentences/s, in the order
    the results came; so that ratios compare every engine at its best."""
    best: dict[tuple, dict[str, Any]] = {}
    for r in results:
        key = (r["engine"], r["beam"], r["batch"])
        if key not in best or r["sentences_per_s"] > best[key]["sentences_per_s"]:
            best[key] = r
    return list(best.values())


def table(results: list[dict[str, Any]]) -> str:
    """Every engine at its best setting (best_of), with the setting and the ratios between bests."""
    lines = ["| beam | batch | engine | best setting | target tok/s | sent/s | vs torch | vs ct2 same precision | "
             "p50 / p99 ms a batch | peak RSS MB | BLEU |",
             "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    results = best_of(results)
    index = {(r["engine"], r["beam"], r["batch"]): r for r in results}
    for r in results:
        torch_run = index.get(("torch", r["beam"], r["batch"]))
        peer = {"onnx-fp32": "ct2-float32", "onnx-int8": "ct2-int8"}.get(r["engine"])
        peer_run = index.get((peer, r["beam"], r["batch"])) if peer else None
        vs_torch = f"{r['tokens_per_s'] / torch_run['tokens_per_s']:.2f}x" if torch_run else "-"
        vs_peer = f"{r['tokens_per_s'] / peer_run['tokens_per_s']:.2f}x" if peer_run else "-"
        latency = (f"{r['batch_p50_ms']:.1f} / {r['batch_p99_ms']:.1f}" if "batch_p99_ms" in r
                   else "-")  # results written before the latencies were recorded
        lines.append(f"| {r['beam']} | {r['batch']} | {r['engine']} | {setting_of(r)} | {r['tokens_per_s']:.0f} | "
                     f"{r['sentences_per_s']:.1f} | "
                     f"{vs_torch} | {vs_peer} | {latency} | {r['peak_rss_mb']:.0f} | {r['bleu']:.2f} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnserve bench", description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="training run directory (torch and CTranslate2 weights)")
    parser.add_argument("--bundle", type=Path, required=True, help="bundle exported from that run (fp32 and int8)")
    parser.add_argument("--split", type=Path, default=Path("data/en-fr/test.tsv"))
    parser.add_argument("--sentences", type=int, default=500)
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--beams", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="thread counts to measure each engine with; the table keeps each engine's best")
    parser.add_argument("--instances", type=int, nargs="+", default=[1, 2],
                        help="decoders working on batches in parallel (CTranslate2: inter_threads); with N > 1, "
                        "--threads is each one's, and N x threads stays within the largest --threads")
    parser.add_argument("--ct2-mkl", nargs="+", default=["0", "1"], choices=["0", "1", ""],
                        help="CT2_USE_MKL values to measure CTranslate2 with ('' leaves the environment's)")
    parser.add_argument("--workdir", type=Path, default=Path("build/bench"))
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--one", choices=ENGINES, help=argparse.SUPPRESS)  # internal: one measurement
    parser.add_argument("--spin-step", action="store_true", help=argparse.SUPPRESS)  # internal: with --one
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.one:
        print(json.dumps(measure(args.one, args.run, args.bundle, args.split, args.sentences, args.beams[0],
                                 args.batches[0], args.threads[0], args.workdir, args.spin_step,
                                 args.instances[0])))
        return 0
    results = run_all(args)
    from attnserve.model.hardware import cpu_info  # torch: only the orchestrator's report needs it

    cpu = cpu_info()["model"]
    header = (f"{len(results)} runs on {cpu}, threads {args.threads}, instances {args.instances}, "
              f"CT2_USE_MKL {args.ct2_mkl}, "
              f"{args.sentences} sentences of {args.split}; each engine at its best setting")
    print(header + "\n\n" + table(results))
    if args.json:
        args.json.write_text(json.dumps({"setup": header, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
