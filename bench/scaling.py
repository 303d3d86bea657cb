"""Scaling curves of the onnxruntime engine: how throughput, step time and memory grow with the
batch and with the source, for docs/performance.md ("Scaling").

    python -m attnserve.bench.scaling build/repo/en-fr/2 --split data/en-fr/test.tsv --out build/scaling

Three measurements, each precision of the bundle, beam 4, one process, the engine's session
options, `--threads` onnxruntime threads:

- **batch size** (1 to 128 sentences a batch): the first `--sentences` test sentences in
  length-sorted batches, as `attnserve bench` runs them; sentences/s, and milliseconds per
  decoder step (onnxruntime time of the step graph, from the engine's run observer).
- **source length** (5 to 200 source tokens): a batch of 8 sources of exactly L tokens (test
  sentences joined until they are that long), decoded for a fixed 16 target steps, so that only
  the source changes; milliseconds per step and the encoder's time.
- **memory per in-flight sentence**: the decoder state one sentence holds, from the bundle's
  state signature: its cross-attention keys and values (per source token) and its
  self-attention cache (per generated token), for each of its beam rows.

Writes scaling.json and scaling.png (three panels) under --out, and logs the CPU model.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from attnserve.bundle_format import STEP_GRAPH
from attnserve.model.corpus import load_tsv
from attnserve.model.hardware import cpu_info
from attnserve.server.bundle import load_bundle
from attnserve.server.engine import Engine, TranslationOptions

log = logging.getLogger("attnserve.bench.scaling")

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)
SOURCE_LENGTHS = (5, 10, 25, 50, 100, 200)
FIXED_STEPS = 16  # target steps of the source-length runs
BEAM = 4


class StepTimer:
    """The engine's run observer: counts the decoder steps and the time onnxruntime spends in them."""

    def __init__(self) -> None:
        self.steps, self.seconds = 0, 0.0

    def __call__(self, graph: str, seconds: float) -> None:
        if graph == STEP_GRAPH:
            self.steps += 1
            self.seconds += seconds

    def reset(self) -> None:
        self.steps, self.seconds = 0, 0.0


def batch_curve(engine: Engine, timer: StepTimer, sources: list[list[int]]) -> list[dict[str, Any]]:
    opts = TranslationOptions(beam_size=BEAM)
    engine.translate_ids(sources[:8], opts)  # warm-up
    points = []
    for size in BATCH_SIZES:
        timer.reset()
        started = time.perf_counter()
        engine.translate_ids(sources, opts, max_batch_tokens=10**9, max_batch_sentences=size)
        seconds = time.perf_counter() - started
        points.append({"batch": size, "sentences_per_s": round(len(sources) / seconds, 2),
                       "ms_per_step": round(timer.seconds / timer.steps * 1e3, 3), "steps": timer.steps})
        log.info("batch %d: %s", size, points[-1])
    return points


def sources_of_length(pool: list[list[int]], length: int, count: int, eos: int) -> list[list[int]]:
    """`count` sources of exactly `length` ids (EOS included): test sentences joined and cut."""
    flat = [token for ids in pool for token in ids if token != eos]
    out = []
    for i in range(count):
        start = (i * 997) % max(1, len(flat) - length)
        out.append(flat[start: start + length - 1] + [eos])
    return out


def source_curve(engine: Engine, timer: StepTimer, pool: list[list[int]]) -> list[dict[str, Any]]:
    opts = TranslationOptions(beam_size=BEAM, max_len_a=0, max_len_b=FIXED_STEPS, min_length=FIXED_STEPS)
    points = []
    for length in SOURCE_LENGTHS:
        sources = sources_of_length(pool, length, 8, engine.eos)
        engine.translate_ids(sources, opts)  # warm-up at this shape
        timer.reset()
        started = time.perf_counter()
        engine.translate_ids(sources, opts, max_batch_tokens=10**9, max_batch_sentences=8)
        seconds = time.perf_counter() - started
        points.append({"source_tokens": length, "ms_per_step": round(timer.seconds / timer.steps * 1e3, 3),
                       "steps": timer.steps, "encoder_and_search_ms": round((seconds - timer.seconds) * 1e3, 2)})
        log.info("source length %d: %s", length, points[-1])
    return points


def state_bytes(engine: Engine) -> dict[str, int]:
    """Bytes of decoder state: per source token (static: per sentence when the bundle shares it
    by sentence, `static_per_sentence`, else per beam row) and per target step (the cache, per
    beam row)."""
    signature = engine.bundle.manifest.state

    def bytes_per_position(tensors, axes: dict[str, int]) -> int:
        # the fixed axes of each tensor that has the axis (heads, head size), times its item size
        return sum(np.dtype(t.dtype).itemsize * int(np.prod([a for a in t.shape if isinstance(a, int)]))
                   for t in tensors if t.name in axes)

    return {"per_source_token": bytes_per_position(signature.static, signature.source_axes()),
            "per_target_step": bytes_per_position(signature.dynamic, signature.past_axes()),
            "static_per_sentence": int(signature.static_per_sentence)}


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_batch, ax_source, ax_memory) = plt.subplots(1, 3, figsize=(15, 4.2))
    ax_step = ax_batch.twinx()  # ms a step on its own axis
    for precision, curves in report["precisions"].items():
        batch = curves["batch"]
        sizes = [p["batch"] for p in batch]
        ax_batch.plot(sizes, [p["sentences_per_s"] for p in batch], "o-", label=f"{precision}: sentences/s (left)")
        ax_step.plot(sizes, [p["ms_per_step"] for p in batch], "s--", label=f"{precision}: ms a step (right)")
        source = curves["source"]
        ax_source.plot([p["source_tokens"] for p in source], [p["ms_per_step"] for p in source], "o-",
                       label=f"{precision}: ms a step (8 sentences, beam 4)")
    ax_batch.set(xscale="log", xlabel="sentences a batch (beam 4)", ylabel="sentences/s", title="Batch size")
    ax_step.set(yscale="log", ylabel="ms a decoder step")
    ax_step.legend(fontsize=8, loc="lower right")
    ax_batch.set_xticks(BATCH_SIZES, [str(s) for s in BATCH_SIZES])
    ax_source.set(xscale="log", xlabel="source tokens", ylabel="ms a decoder step",
                  title=f"Source length ({FIXED_STEPS} target steps)")
    ax_source.set_xticks(SOURCE_LENGTHS, [str(s) for s in SOURCE_LENGTHS])
    memory = report["state_bytes"]
    lengths = np.array([10, 25, 50, 100, 200])
    static_copies = 1 if memory.get("static_per_sentence") else BEAM  # one static copy per sentence, or per beam row
    ax_memory.plot(lengths, lengths * (static_copies * memory["per_source_token"] + BEAM * memory["per_target_step"]) / 2**20,
                   "o-", label=f"beam {BEAM}, target as long as the source")
    ax_memory.set(xlabel="source tokens", ylabel="MiB", title="Decoder state of one sentence")
    for ax in (ax_batch, ax_source, ax_memory):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"{report['bundle']}, {report['cpu']}, {report['threads']} onnxruntime thread(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--split", type=Path, default=Path("data/en-fr/test.tsv"))
    parser.add_argument("--sentences", type=int, default=256)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "int8"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--spin", action="store_true", help="the step session's workers spin (Engine spin_step)")
    parser.add_argument("--out", type=Path, default=Path("build/scaling"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    bundle = load_bundle(args.bundle)
    report: dict[str, Any] = {"bundle": str(args.bundle), "split": str(args.split), "sentences": args.sentences,
                              "beam": BEAM, "threads": args.threads, "spin_step": args.spin, "cpu": cpu_info()["model"], "precisions": {}}
    texts = [source for source, _ in load_tsv(args.split)]
    for precision in args.precisions:
        timer = StepTimer()
        engine = Engine(bundle, precision, "cpu", args.threads, run_observer=timer, spin_step=args.spin)
        pool = engine.encode_texts(texts)
        report["precisions"][precision] = {"batch": batch_curve(engine, timer, pool[: args.sentences]),
                                           "source": source_curve(engine, timer, pool)}
        report["state_bytes"] = state_bytes(engine)
        engine.close()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scaling.json").write_text(json.dumps(report, indent=1))
    plot(report, args.out / "scaling.png")
    log.info("wrote %s and %s", args.out / "scaling.json", args.out / "scaling.png")


if __name__ == "__main__":
    main()
