"""Where a decoder step's time goes when the engine decodes real sentences: onnxruntime's run of
the step graph, the engine's glue around it (feeds, output values, state bookkeeping), the search
(`BeamBatch.step` less the model's step), and the encoder, each per decoder step.

`bench/step_profile.py` times the step graph alone on a fixed feed; this times the whole loop
the way `Engine.translate_ids` runs it (length-sorted batches of `--batch` sentences), so that
the Python between onnxruntime runs shows. With `--instances N`, N engines of `--threads`
threads each decode every N-th batch on N Python threads at once, as `attnserve bench
--instances` and the server's instances do: comparing the split with one instance shows what
running side by side costs, in onnxruntime (the cores and caches) and in Python (the GIL).

    python -m attnserve.bench.step_split build/repo/en-fr/2 --precision int8 --batch 1
    python -m attnserve.bench.step_split build/repo/en-fr/2 --precision int8 --batch 1 --instances 2 --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from attnserve.bundle_format import ENCODER_GRAPH, STEP_GRAPH
from attnserve.model.hardware import cpu_info
from attnserve.server.bundle import load_bundle
from attnserve.server.engine import Engine
from attnserve.server.search import BeamBatch, SearchItem, TranslationOptions
from attnserve.server.state import DecoderState

log = logging.getLogger("attnserve.bench.step_split")


@dataclasses.dataclass
class Split:
    """Seconds spent by one instance, summed over its batches."""
    steps: int = 0
    step_graph: float = 0.0  # onnxruntime, step graph (the engine's run observer)
    encoder_graph: float = 0.0  # onnxruntime, encoder graph
    decode_step: float = 0.0  # Engine.decode_step: the step graph and the engine's glue
    search_step: float = 0.0  # BeamBatch.step: decode_step and the search
    add: float = 0.0  # BeamBatch.add: the encoder and the joining rows' state

    def reset(self) -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, field.default)

    def observe(self, graph: str, seconds: float) -> None:
        if graph == STEP_GRAPH:
            self.step_graph += seconds
            self.steps += 1
        elif graph == ENCODER_GRAPH:
            self.encoder_graph += seconds

    def per_step_ms(self) -> dict[str, float]:
        steps = max(self.steps, 1)
        parts = {"onnxruntime_step_graph": self.step_graph, "engine_glue": self.decode_step - self.step_graph,
                 "search_python": self.search_step - self.decode_step, "encoder_graph": self.encoder_graph,
                 "joining_state": self.add - self.encoder_graph}
        return {name: 1e3 * seconds / steps for name, seconds in parts.items()}


class TimedStep:
    """An engine behind the search's DecoderStep interface, with its decode_step timed."""

    def __init__(self, engine: Engine, split: Split):
        self.engine, self.split = engine, split
        self.special_ids, self.vocab_size = engine.special_ids, engine.vocab_size
        self.max_len, self.default_length_limit = engine.max_len, engine.default_length_limit

    def start_state(self, source_ids: np.ndarray, copies: int) -> DecoderState:
        return self.engine.start_state(source_ids, copies)

    def join_state(self, state: DecoderState, source_ids: np.ndarray, copies: int) -> None:
        self.engine.join_state(state, source_ids, copies)

    def decode_step(self, *args: Any) -> tuple:
        started = time.perf_counter()
        try:
            return self.engine.decode_step(*args)
        finally:
            self.split.decode_step += time.perf_counter() - started


def decode_batches(engine: Engine, split: Split, batches: list[list[list[int]]], opts: TranslationOptions) -> None:
    """Decode each batch to the end, as Engine.translate_ids does, timing add and step."""
    model = TimedStep(engine, split)
    for sources in batches:
        batch = BeamBatch(model, opts.beam_size)
        started = time.perf_counter()
        batch.add([SearchItem(src, opts, None, i) for i, src in enumerate(sources)])
        split.add += time.perf_counter() - started
        while len(batch):
            started = time.perf_counter()
            batch.step()
            split.search_step += time.perf_counter() - started


def run(bundle: Path, precision: str, sentences: list[str], batch: int, beam: int, instances: int, threads: int,
        spin: bool) -> dict[str, Any]:
    splits = [Split() for _ in range(instances)]
    engines = [Engine(load_bundle(bundle), precision, device="cpu", threads=threads, run_observer=split.observe,
                      spin_step=spin) for split in splits]
    for engine in engines:
        engine.warm_up()
    for split in splits:  # the warm-up is not measured
        split.reset()
    ids = sorted(engines[0].encode_texts(sentences), key=len)
    batches = [ids[start:start + batch] for start in range(0, len(ids), batch)]
    opts = TranslationOptions(beam_size=beam)
    workers = [threading.Thread(target=decode_batches, args=(engine, split, batches[i::instances], opts))
               for i, (engine, split) in enumerate(zip(engines, splits))]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    wall = time.perf_counter() - started
    total = Split(**{field.name: sum(getattr(split, field.name) for split in splits) for field in dataclasses.fields(Split)})
    per_step = total.per_step_ms()  # over every instance's steps
    # The wall time of a decoder step on one instance: the instances' time, whatever they spent it on.
    per_step["wall_per_instance"] = 1e3 * wall * instances / max(total.steps, 1)
    steps = total.steps
    return {"precision": precision, "batch": batch, "beam": beam, "instances": instances, "threads": threads,
            "spin": spin, "sentences": len(ids), "steps": steps, "sentences_per_s": len(ids) / wall,
            "ms_per_step": per_step}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--split", type=Path, default=Path("data/en-fr/test.tsv"), help="TSV: source, tab, target")
    parser.add_argument("--sentences", type=int, default=200)
    parser.add_argument("--precision", default="int8")
    parser.add_argument("--batch", type=int, default=1, help="sentences a batch")
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--instances", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads an instance")
    parser.add_argument("--spin", action="store_true", help="the step session's workers spin (Engine spin_step)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sentences = [line.split("\t")[0] for line in args.split.read_text(encoding="utf-8").splitlines()[: args.sentences]]
    hardware = cpu_info()
    result = run(args.bundle, args.precision, sentences, args.batch, args.beam, args.instances, args.threads, args.spin)
    log.info("%s, onnxruntime %s; %s, batch %d, beam %d, %d instance(s) x %d thread(s): %.1f sentences/s, %d steps",
             hardware["model"], ort.__version__, args.precision, args.batch, args.beam, args.instances, args.threads,
             result["sentences_per_s"], result["steps"])
    for name, ms in result["ms_per_step"].items():
        log.info("  %-24s %7.3f ms a step", name, ms)
    if args.json:
        args.json.write_text(json.dumps({"hardware": hardware, "onnxruntime": ort.__version__, **result}, indent=1) + "\n")


if __name__ == "__main__":
    main()
