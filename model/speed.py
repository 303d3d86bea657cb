"""Training throughput: target tokens/s of the real train step under variants of one config.

    python -m attnserve.model.speed --config configs/transformer.toml --threads 2 \\
        --variant fp32:precision=fp32 --variant bf16:precision=bf16 --rounds 3

Every variant trains a fresh model (same seed) on the first batches of epoch 0, exactly as
`attnserve train` would; the first --warmup steps (compilation, allocator warm-up) are timed
apart and the next --steps give the throughput. Variants run interleaved, one round after the
other, and the median over rounds is reported with the load average around each run, because
the machine may be shared. Variant keys: any [train] setting (precision, compile, max_tokens,
...), adamw = fused | foreach | for-loop, sync = true (read the loss every step, as the loop
did before its metrics stayed on the device).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch._dynamo

from attnserve.model.batching import token_batches
from attnserve.model.config import Config
from attnserve.model.hardware import choose_precision, describe_hardware
from attnserve.model.tokenizer import Tokenizer
from attnserve.model.train import Trainer, TrainingData, resolve_device

log = logging.getLogger(__name__)


def parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_settings(text: str) -> dict[str, Any]:
    return {key: parse_value(value) for key, _, value in (item.partition("=") for item in text.split(",") if item)}


def measure(config: Config, tokenizer: Tokenizer, data: TrainingData, settings: dict[str, Any],
            steps: int, warmup: int) -> dict[str, Any]:
    settings = dict(settings)
    adamw, sync = settings.pop("adamw", "fused"), settings.pop("sync", False)
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, **settings))
    device = resolve_device(config.train.device)
    torch.manual_seed(config.train.seed)
    trainer = Trainer(config, Path("/nonexistent"), tokenizer, data, device, choose_precision(config.train.precision, device))
    if adamw != "fused":
        tc = config.train
        trainer.optimizer = torch.optim.AdamW(trainer.model.parameters(), lr=tc.lr, betas=(0.9, 0.98), eps=1e-9,
                                              weight_decay=tc.weight_decay, foreach=adamw == "foreach", fused=False)
        trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda step: 1.0)
    trainer.training_model = trainer._wrap_for_training()
    trainer.model.train()
    lengths = [max(len(s), len(t) + 1) for s, t in data.train]
    batches = token_batches(lengths, config.train.max_tokens, seed=config.train.seed * 1000)
    torch._dynamo.utils.counters.clear()
    load_before = os.getloadavg()[0]
    tokens = 0
    start = time.perf_counter()
    for i in range(warmup + steps):
        if i == warmup:
            trainer._loss_sum.item()
            warmup_seconds, start, tokens = time.perf_counter() - start, time.perf_counter(), 0
        tokens += trainer.train_step([data.train[j] for j in batches[i]])
        if sync:
            trainer._loss_sum.item()
    loss = trainer._loss_sum.item()
    seconds = time.perf_counter() - start
    frames = torch._dynamo.utils.counters["stats"].get("unique_graphs", 0) if config.train.compile else 0
    return {"tokens_per_s": tokens / seconds, "warmup_s": warmup_seconds, "loss_sum": loss,
            "graphs": frames, "load": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "precision": trainer.precision, "parameters": trainer.model.num_parameters()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--model", default="", help="model overrides, e.g. d_model=512,d_ff=2048,n_heads=8")
    parser.add_argument("--tokenizer", default="models/transformer-en-fr/spm.model")
    parser.add_argument("--variant", action="append", required=True, help="NAME:key=value,key=value")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="write every measurement here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    config = Config.load(args.config)
    config.model = dataclasses.replace(config.model, **parse_settings(args.model))
    config.train.threads = args.threads
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = Tokenizer(args.tokenizer)
    config.model.vocab_size = tokenizer.vocab_size
    data = TrainingData.load(config, tokenizer)
    variants = {name: parse_settings(settings) for name, _, settings in (v.partition(":") for v in args.variant)}
    hardware = describe_hardware(torch.device("cpu") if config.train.device == "cpu" else resolve_device(config.train.device))
    print(json.dumps(hardware))
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    for round_index in range(args.rounds):
        for name, settings in variants.items():
            result = measure(config, tokenizer, data, settings, args.steps, args.warmup)
            results[name].append(result)
            print(f"round {round_index + 1} {name:<24} {result['tokens_per_s']:7.0f} tok/s  warm-up {result['warmup_s']:6.1f} s"
                  f"  graphs {result['graphs']}  load {result['load']}", flush=True)
    print(f"\n{config.model.label}, {results[next(iter(results))][0]['parameters']:,} parameters, "
          f"{torch.get_num_threads()} threads, {hardware['cpu']['model']}; median of {args.rounds}:")
    for name, runs in results.items():
        print(f"  {name:<24} {statistics.median(r['tokens_per_s'] for r in runs):7.0f} target tokens/s"
              f"  (warm-up {statistics.median(r['warmup_s'] for r in runs):.1f} s for {args.warmup} steps)")
    if args.json:
        Path(args.json).write_text(json.dumps({"hardware": hardware, "config": dataclasses.asdict(config),
                                               "variants": variants, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
