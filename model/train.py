"""Training loop: token batches, label smoothing, AdamW with warm-up, clipping, bf16 autocast
(CUDA, and CPUs with native bf16 matmul), atomic checkpoints with full resume, early stopping on
dev BLEU, JSONL metrics, data-parallel training under torchrun.

Resume restores model, optimiser, scheduler, RNG and the data position: batches of an epoch are
a pure function of (seed, epoch), so a resumed run skips exactly the batches already seen.

Distributed (`torchrun --nproc-per-node N --no-python attnserve train ...`; DDP over gloo on
CPU, nccl on CUDA): every rank builds the same global token batches and trains on its shard
(examples rank, rank + N, ... of each batch). A rank's loss is its summed token loss divided by
the global batch's target tokens, times N, so DDP's gradient average is exactly the gradient of
the single-process loss on the same global batch. Rank 0 alone evaluates, writes checkpoints and
logs; the others wait for its dev BLEU, so that early stopping agrees.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import sacrebleu
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from attnserve.model.batching import Example, collate, encode_pairs, token_batches
from attnserve.model.checkpoint import (load_trainer_state, load_weights, read_config, save_checkpoint,
                                        weights_path, write_config)
from attnserve.model.config import Config, TrainConfig
from attnserve.model.corpus import load_tsv
from attnserve.model.decode import DecodeOptions
from attnserve.model.evaluate import translate_best
from attnserve.model.hardware import Precision, choose_precision, describe_hardware
from attnserve.model.tokenizer import PAD_ID, Tokenizer, train_tokenizer
from attnserve.model.zoo import build_model

log = logging.getLogger(__name__)

STOP_REASONS = ("max_steps", "time_limit", "max_epochs", "early_stopping", "signal")
# Train settings a resumed run takes from the command line; the rest come from its config.json.
RESUME_OVERRIDES = ("time_limit_min", "max_steps", "max_epochs", "threads", "device", "precision", "compile", "log_every")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def inverse_sqrt_schedule(warmup: int):
    """Linear warm-up to the peak rate, then decay with 1/sqrt(step)."""
    def factor(step: int) -> float:
        step = max(step, 1)
        return min(step / warmup, math.sqrt(warmup / step))
    return factor


def linear_schedule(warmup: int, total: int):
    """Linear warm-up to the peak rate, then linear decay to zero at step `total`."""
    def factor(step: int) -> float:
        step = max(step, 1)
        return step / warmup if step < warmup else max(0.0, (total - step) / (total - warmup))
    return factor


def lr_schedule(tc: TrainConfig):
    """The multiplier of the peak learning rate at each step (train.lr_schedule)."""
    if tc.lr_schedule == "linear":
        return linear_schedule(tc.warmup_steps, tc.max_steps)
    return inverse_sqrt_schedule(tc.warmup_steps)


@dataclasses.dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job; rank 0 of 1 without torchrun."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "Distributed":
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclasses.dataclass
class TrainingData:
    train: list[Example]
    dev_rows: list[tuple[str, str]]
    dev: list[Example]
    extra_dev: dict[str, list[tuple[str, str]]]  # name -> rows; BLEU only, never for stopping

    @classmethod
    def load(cls, config: Config, tokenizer: Tokenizer) -> "TrainingData":
        tc, max_len = config.train, config.model.max_len
        data_dir = Path(tc.data_dir)
        limit = tc.eval_sentences or None
        dev_rows = load_tsv(data_dir / "dev.tsv")[:limit]
        extra = {Path(p).stem if Path(p).stem != "dev" else str(p): load_tsv(Path(p))[:limit] for p in tc.extra_dev}
        return cls(encode_pairs(tokenizer, load_tsv(data_dir / "train.tsv"), max_len), dev_rows,
                   encode_pairs(tokenizer, dev_rows, max_len), extra)


class TranslationTask:
    """What the loop trains on, for translation: token batches of sentence pairs, the
    label-smoothed token cross-entropy, dev loss and greedy dev BLEU. Another model family
    (the image reader, model/vision/task.py) supplies an object with the same methods; the
    loop, checkpoints, resume, schedules and stopping are the Trainer's, shared."""

    metric = "bleu"  # the dev score that selects the best checkpoint and drives early stopping
    metric_label = "BLEU"

    def __init__(self, config: Config, tokenizer: Tokenizer, data: TrainingData):
        self.config, self.tokenizer, self.data = config, tokenizer, data
        self._lengths = [max(len(s), len(t) + 1) for s, t in data.train]

    def sizes(self) -> dict[str, int]:
        return {"train_pairs": len(self.data.train), "dev_pairs": len(self.data.dev)}

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        tc = self.config.train
        return token_batches(self._lengths, tc.max_tokens, seed=tc.seed * 1000 + epoch)

    def examples(self, batch: list[int]) -> list[Example]:
        return [self.data.train[i] for i in batch]

    def units(self, examples: list[Example]) -> int:
        """What the loss is averaged over: target tokens with EOS."""
        return sum(len(t) + 1 for _, t in examples)

    def loss(self, model: nn.Module, shard: list[Example], device: torch.device, precision: Precision
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(objective summed over the shard, the logged token loss sum); for translation the same."""
        src, tgt_in, tgt_out = (x.to(device, non_blocking=True) for x in collate(shard))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(src, tgt_in)  # (B, T, V)
        token_loss_sum = F.cross_entropy(logits.flatten(0, 1).float(), tgt_out.flatten(), ignore_index=PAD_ID,
                                         label_smoothing=self.config.train.label_smoothing, reduction="sum")
        return token_loss_sum, token_loss_sum

    @torch.inference_mode()
    def dev_loss(self, model: nn.Module, device: torch.device) -> float:
        model.eval()
        total, tokens = torch.zeros((), device=device), 0
        dev = self.data.dev
        for batch in token_batches([max(len(s), len(t) + 1) for s, t in dev], self.config.train.max_tokens):
            src, tgt_in, tgt_out = (x.to(device) for x in collate([dev[i] for i in batch]))
            logits = model(src, tgt_in)
            total += F.cross_entropy(logits.flatten(0, 1).float(), tgt_out.flatten(), ignore_index=PAD_ID, reduction="sum")
            tokens += sum(len(dev[i][1]) + 1 for i in batch)
        return total.item() / max(tokens, 1)

    def _bleu(self, model: nn.Module, rows: list[tuple[str, str]]) -> float:
        hyps = translate_best(model, self.tokenizer, [s for s, _ in rows], DecodeOptions())
        return sacrebleu.corpus_bleu(hyps, [[t for _, t in rows]]).score

    def evaluate(self, model: nn.Module, device: torch.device) -> tuple[float, dict[str, Any], str]:
        """(dev BLEU, the log record, the log line's text with "{best}" where the trainer marks
        an improvement); leaves the model in eval mode."""
        loss = self.dev_loss(model, device)
        bleu = self._bleu(model, self.data.dev_rows)
        record: dict[str, Any] = {"dev_loss": round(loss, 4), "dev_bleu": round(bleu, 2)}
        if self.data.extra_dev:
            record["extra_dev_bleu"] = {name: round(self._bleu(model, rows), 2) for name, rows in self.data.extra_dev.items()}
        text = f"dev loss {loss:.3f}, dev BLEU {bleu:.2f}{{best}}" + "".join(
            f", {k} BLEU {v:.2f}" for k, v in record.get("extra_dev_bleu", {}).items())
        return bleu, record, text


class Trainer:
    """Model, optimiser and loop state of one run. Construction only builds them (the model's
    initial weights draw on torch's RNG); run_training does the setup: process group, threads,
    seed, tokenizer, data."""

    def __init__(self, config: Config, run_dir: Path, tokenizer: Tokenizer | None, data: TrainingData | None,
                 device: torch.device, precision: Precision = "fp32", distributed: Distributed = Distributed(),
                 task: Any = None):
        self.config, self.run_dir, self.tokenizer, self.data = config, run_dir, tokenizer, data
        # The task: translation unless another family's task is given (model/vision/task.py).
        self.task = task if task is not None else TranslationTask(config, tokenizer, data)
        self.device, self.precision, self.dist = device, precision, distributed
        tc = config.train
        self.model = build_model(config.model).to(device)
        self.training_model: nn.Module = self.model  # DDP- and/or compile-wrapped by train()
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=tc.lr, betas=(0.9, 0.98), eps=1e-9, weight_decay=tc.weight_decay, fused=True,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_schedule(tc))
        self.step = self.epoch = self.batch_in_epoch = self.bad_evals = 0
        self.best_bleu = -1.0
        self.train_seconds = 0.0
        self.stop_requested = False
        # Train metrics since the last record, summed on the device: read once per log_every steps.
        self._loss_sum = torch.zeros((), device=device)
        self._grad_norm_sum = torch.zeros((), device=device)
        self._interval = {"steps": 0, "tokens": 0, "start": time.perf_counter()}

    # -- setup -------------------------------------------------------------------------------

    def resume(self) -> bool:
        last = self.run_dir / "checkpoints" / "last"
        if not (last / "trainer.pt").is_file():
            return False
        load_weights(self.model, last / "model.safetensors", str(self.device))
        state = load_trainer_state(last)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for name in ("step", "epoch", "batch_in_epoch", "best_bleu", "bad_evals", "train_seconds"):
            setattr(self, name, state[name])
        cpu_states = state.get("rng_per_rank") or [state["rng"]]
        cuda_states = state.get("cuda_rng_per_rank") or []
        if len(cpu_states) == self.dist.world_size:
            torch.set_rng_state(cpu_states[self.dist.rank])
            if self.device.type == "cuda" and len(cuda_states) == self.dist.world_size:
                torch.cuda.set_rng_state(cuda_states[self.dist.rank], self.device)
        else:  # the data order does not depend on the number of processes; dropout does
            log.warning("checkpoint of %d processes resumed by %d: dropout RNG reseeded (data order unchanged)",
                        len(cpu_states), self.dist.world_size)
            torch.manual_seed(self.config.train.seed + 1_000_003 * self.dist.rank + self.step)
        if self.dist.is_main:
            log.info("resumed from step %d (epoch %d, batch %d, best dev BLEU %.2f)",
                     self.step, self.epoch, self.batch_in_epoch, self.best_bleu)
        return True

    def init_weights_from(self, source: Path) -> None:
        """Warm start: the weights of another run's best checkpoint (or of a .safetensors file)."""
        weights = weights_path(source)
        load_weights(self.model, weights, str(self.device))
        if self.dist.is_main:
            log.info("initialised %s from %s", self.config.model.label, weights)

    def log_start(self, resumed: bool) -> None:
        """The header record of every (re)start: the hardware and how it is used."""
        tc = self.config.train
        hardware = describe_hardware(self.device)
        self.log_metrics({"event": "start", "resumed": resumed, "precision": self.precision,
                          "world_size": self.dist.world_size, "compile": tc.compile, "max_tokens": tc.max_tokens,
                          "init_from": tc.init_from or None, "parameters": self.model.num_parameters(),
                          **self.task.sizes(), "hardware": hardware})
        if self.dist.is_main:
            (train_name, train_size), (_, dev_size) = self.task.sizes().items()
            log.info("%s: %s parameters, %d train / %d dev %s; %s x %d, %s, %d torch threads, %s",
                     self.config.model.label, f"{self.model.num_parameters():,}", train_size,
                     dev_size, train_name.removeprefix("train_"), self.device, self.dist.world_size,
                     hardware["cpu"]["model"], hardware["torch_threads"], self.precision)

    # -- checkpoints and evaluation ----------------------------------------------------------

    def _meta(self, bleu: float | None = None) -> dict[str, Any]:
        metric = self.task.metric  # "bleu" for translation: dev_bleu, best_dev_bleu
        return {"step": self.step, "epoch": self.epoch, f"dev_{metric}": bleu, f"best_dev_{metric}": self.best_bleu,
                "train_seconds": round(self.train_seconds, 1), "model": self.config.model.label,
                "precision": self.precision, "world_size": self.dist.world_size}

    def _rng_states(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Every rank's CPU (and CUDA) RNG state; a collective under DDP."""
        local = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            local["cuda"] = torch.cuda.get_rng_state(self.device)
        states = [local]
        if self.dist.enabled:
            states = [None] * self.dist.world_size
            dist.all_gather_object(states, local)
        return [s["cpu"] for s in states], [s["cuda"] for s in states if "cuda" in s]

    def save_last(self) -> None:
        cpu_states, cuda_states = self._rng_states()
        if not self.dist.is_main:
            return
        trainer = {
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "rng": cpu_states[0], "rng_per_rank": cpu_states, "cuda_rng_per_rank": cuda_states,
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "best_bleu": self.best_bleu, "bad_evals": self.bad_evals, "train_seconds": self.train_seconds,
        }
        save_checkpoint(self.run_dir / "checkpoints" / "last", self.model, self._meta(), trainer)

    def log_metrics(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        with open(self.run_dir / "log.jsonl", "a") as f:
            f.write(json.dumps({"time": round(time.time(), 1), "step": self.step, "epoch": self.epoch, **record}) + "\n")

    def dev_loss(self) -> float:
        return self.task.dev_loss(self.model, self.device)

    def evaluate(self) -> float:
        """The task's dev evaluation (translation: dev loss and greedy dev BLEU, and the extra
        dev sets' BLEU) on rank 0, which keeps the best checkpoint; every rank gets the score,
        so early stopping agrees. Returns the score (named bleu below: translation's)."""
        record: dict[str, Any] = {}
        text = ""
        bleu = 0.0
        if self.dist.is_main:
            bleu, record, text = self.task.evaluate(self.model, self.device)
            self.model.train()
        if self.dist.enabled:  # the other ranks wait here for rank 0's evaluation
            shared = torch.tensor([bleu], dtype=torch.float64, device=self.device)
            dist.broadcast(shared, src=0)
            bleu = shared.item()
        improved = bleu > self.best_bleu
        if improved:
            self.best_bleu, self.bad_evals = bleu, 0
            if self.dist.is_main:
                save_checkpoint(self.run_dir / "checkpoints" / "best", self.model, self._meta(bleu))
        else:
            self.bad_evals += 1
        if self.dist.is_main:
            self.log_metrics({**record, "best": improved, "train_seconds": round(self.train_seconds, 1)})
            log.info("step %d: %s", self.step, text.replace("{best}", " (best)" if improved else ""))
        return bleu

    # -- the loop ----------------------------------------------------------------------------

    def train_step(self, examples: list[Example]) -> int:
        """One update on a global batch; returns its target tokens. No host sync."""
        tc = self.config.train
        batch_tokens = self.task.units(examples)  # target tokens with EOS, on every rank
        shard, weight = examples[self.dist.rank :: self.dist.world_size], 1.0
        if not shard:  # fewer examples than ranks: join the gradient all-reduce with a zero loss
            shard, weight = examples[:1], 0.0
        objective, token_loss_sum = self.task.loss(self.training_model, shard, self.device, self.precision)
        loss = objective * (weight * self.dist.world_size / batch_tokens)  # DDP averages over ranks
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.clip_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self._loss_sum += token_loss_sum.detach() * weight
        self._grad_norm_sum += grad_norm.detach()
        return batch_tokens

    def log_train_interval(self, bar: tqdm) -> None:
        """The train record of the steps since the last one: token-averaged loss, mean gradient
        norm, tokens/s of wall time (evaluations excluded). The loop's one host sync."""
        interval = self._interval
        if self.dist.enabled:
            dist.all_reduce(self._loss_sum)
        loss = self._loss_sum.item() / max(interval["tokens"], 1)
        grad_norm = self._grad_norm_sum.item() / max(interval["steps"], 1)
        seconds = time.perf_counter() - interval["start"]
        lr = self.scheduler.get_last_lr()[0]
        tokens_per_s = interval["tokens"] / max(seconds, 1e-9)
        self.log_metrics({"train_loss": round(loss, 4), "lr": lr, "grad_norm": round(grad_norm, 3),
                          "tokens_per_s": round(tokens_per_s), "steps": interval["steps"]})
        bar.set_postfix(epoch=self.epoch, loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:.0f}", lr=f"{lr:.1e}", refresh=False)
        self._reset_interval()

    def _reset_interval(self) -> None:
        self._loss_sum.zero_()
        self._grad_norm_sum.zero_()
        self._interval = {"steps": 0, "tokens": 0, "start": time.perf_counter()}

    def out_of_budget(self) -> str | None:
        tc = self.config.train
        if tc.max_steps and self.step >= tc.max_steps:
            return "max_steps"
        if tc.time_limit_min and self.train_seconds >= tc.time_limit_min * 60:
            return "time_limit"
        if self.epoch >= tc.max_epochs:
            return "max_epochs"
        if self.bad_evals >= tc.patience:
            return "early_stopping"
        if self.stop_requested:
            return "signal"
        return None

    def agreed_stop(self) -> str | None:
        """out_of_budget, the same on every rank: time limits and signals are per process, so
        all ranks stop at the first step where any of them has a reason."""
        reason = self.out_of_budget()
        if not self.dist.enabled:
            return reason
        code = torch.tensor([0 if reason is None else STOP_REASONS.index(reason) + 1], device=self.device)
        dist.all_reduce(code, op=dist.ReduceOp.MAX)
        return STOP_REASONS[int(code.item()) - 1] if int(code.item()) else None

    def _wrap_for_training(self) -> nn.Module:
        model: nn.Module = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.config.train.compile:
            # Token batches vary in batch size and both lengths: one dynamic-shape graph, not
            # one graph per shape.
            model = torch.compile(model, dynamic=True)
        return model

    def train(self) -> str:
        tc = self.config.train
        self.training_model = self._wrap_for_training()
        self.model.train()
        interactive = sys.stderr.isatty()
        bar = tqdm(initial=self.step, total=tc.max_steps or None, unit="step", dynamic_ncols=True,
                   mininterval=0.5 if interactive else 30, disable=(None if interactive else False) if self.dist.is_main else True)
        self._reset_interval()
        reason = self.agreed_stop()
        while reason is None:
            batches = self.task.epoch_batches(self.epoch)
            while self.batch_in_epoch < len(batches) and reason is None:
                start = time.perf_counter()
                tokens = self.train_step(self.task.examples(batches[self.batch_in_epoch]))
                self.batch_in_epoch += 1
                self.train_seconds += time.perf_counter() - start
                self._interval["steps"] += 1
                self._interval["tokens"] += tokens
                bar.update(1)
                if self.step % tc.log_every == 0:
                    self.log_train_interval(bar)
                if self.step % tc.eval_every == 0:
                    self.evaluate()
                    self.save_last()
                    self._interval["start"] = time.perf_counter()  # tokens/s counts training only
                reason = self.agreed_stop()
            if self.batch_in_epoch >= len(batches):
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                reason = self.agreed_stop()
        bar.close()
        if self._interval["steps"]:
            self.log_train_interval(bar)
        if self.step % tc.eval_every:
            self.evaluate()
        self.save_last()
        self.log_metrics({"stopped": reason})
        if self.dist.is_main:
            log.info("stopped after %d steps (%s); best dev %s %.2f", self.step, reason, self.task.metric_label,
                     self.best_bleu)
        return reason


def prepare_tokenizer(config: Config, run_dir: Path, distributed: Distributed = Distributed()) -> Tokenizer:
    """RUN/spm.model: kept when it exists, else copied from train.tokenizer or from the warm
    start's run directory, else trained on the training split (by rank 0; the others wait)."""
    tc = config.train
    path = run_dir / "spm.model"
    if distributed.is_main and not path.is_file():
        source = Path(tc.tokenizer) if tc.tokenizer else None
        if source is None and tc.init_from:
            if not Path(tc.init_from).is_dir():
                raise ValueError(f"init_from {tc.init_from} is a weights file: set train.tokenizer to its spm.model")
            source = Path(tc.init_from) / "spm.model"
        run_dir.mkdir(parents=True, exist_ok=True)
        if source is not None:
            shutil.copyfile(source, path)
            log.info("tokenizer %s copied to %s", source, path)
        else:
            rows = load_tsv(Path(tc.data_dir) / "train.tsv")
            train_tokenizer((text for row in rows for text in row), path, config.model.vocab_size)
    if distributed.enabled:
        dist.barrier()
    return Tokenizer(path)


def _init_process_group(distributed: Distributed, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    # Rank 0's evaluations keep the others waiting in a collective: allow an hour.
    dist.init_process_group(backend, timeout=datetime.timedelta(hours=1))
    if distributed.is_main:
        log.info("distributed training: %d processes, %s", distributed.world_size, backend)


def run_training(config: Config, run_dir: Path | None = None, resume: bool = True) -> Trainer:
    """Train (or resume) a run: setup (process group under torchrun, threads, seed, tokenizer,
    data), then the loop. An existing run directory keeps its own config, except for the budgets
    and hardware settings of RESUME_OVERRIDES. The caller's config is not changed."""
    config = copy.deepcopy(config)
    run_dir = Path(run_dir or config.train.out_dir)
    if (run_dir / "config.json").is_file() and resume:
        saved = read_config(run_dir)
        for name in RESUME_OVERRIDES:
            setattr(saved.train, name, getattr(config.train, name))
        config = saved
    tc = config.train
    distributed = Distributed.from_env()
    device = resolve_device(tc.device, distributed.local_rank)
    if distributed.enabled:
        _init_process_group(distributed, device)
    try:
        if tc.threads:
            torch.set_num_threads(tc.threads)
        tokenizer, data, task = None, None, None
        if config.model.arch == "reader":  # images and digits: no tokenizer, no sentence pairs
            from attnserve.model.vision.task import ReaderTask

            task = ReaderTask.load(config)
        else:
            tokenizer = prepare_tokenizer(config, run_dir, distributed)
            config.model.vocab_size = tokenizer.vocab_size
            data = TrainingData.load(config, tokenizer)
        torch.manual_seed(tc.seed)
        trainer = Trainer(config, run_dir, tokenizer, data, device, choose_precision(tc.precision, device), distributed,
                          task)
        if distributed.rank > 0:  # same initial weights (DDP also broadcasts them), own dropout
            torch.manual_seed(tc.seed + 1_000_003 * distributed.rank)
        if distributed.is_main:
            write_config(run_dir, config)
        resumed = resume and trainer.resume()
        if not resumed and tc.init_from:
            trainer.init_weights_from(Path(tc.init_from))
        trainer.log_start(resumed)

        def request_stop(signum, frame):
            log.warning("signal %d: stopping after this step with a checkpoint", signum)
            trainer.stop_requested = True

        previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            trainer.train()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        if distributed.enabled:
            # Tear down together: a rank that destroys its gloo pairs while rank 0 is still
            # writing the last checkpoint can abort in gloo's teardown ("terminate called
            # without an active exception"). The DDP wrapper's reducer holds the group too.
            dist.barrier()
            trainer.training_model = trainer.model
    finally:
        if distributed.enabled and dist.is_initialized():
            dist.destroy_process_group()
    return trainer
