"""Training loop: token batches, label smoothing, AdamW with warm-up, clipping, bf16 autocast on
CUDA, atomic checkpoints with full resume, early stopping on dev BLEU, JSONL metrics.

Resume restores model, optimiser, scheduler, RNG and the data position: batches of an epoch are
a pure function of (seed, epoch), so a resumed run skips exactly the batches already seen.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

import sacrebleu
import torch
import torch.nn.functional as F
from tqdm import tqdm

from attnserve.model.batching import Example, collate, encode_pairs, token_batches
from attnserve.model.checkpoint import load_trainer_state, read_config, save_checkpoint, write_config
from attnserve.model.config import Config
from attnserve.model.corpus import load_tsv
from attnserve.model.decode import DecodeOptions
from attnserve.model.evaluate import translate_best
from attnserve.model.tokenizer import PAD_ID, Tokenizer, train_tokenizer
from attnserve.model.zoo import build_model

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def inverse_sqrt_schedule(warmup: int):
    """Linear warm-up to the peak rate, then decay with 1/sqrt(step)."""
    def factor(step: int) -> float:
        step = max(step, 1)
        return min(step / warmup, math.sqrt(warmup / step))
    return factor


class Trainer:
    def __init__(self, config: Config, run_dir: Path):
        self.config, self.run_dir = config, run_dir
        tc = config.train
        self.device = resolve_device(tc.device)
        if tc.threads:
            torch.set_num_threads(tc.threads)
        torch.manual_seed(tc.seed)
        self.tokenizer = self._tokenizer()
        config.model.vocab_size = self.tokenizer.vocab_size
        data_dir = Path(tc.data_dir)
        max_len = config.model.max_len
        self.train_data = encode_pairs(self.tokenizer, load_tsv(data_dir / "train.tsv"), max_len)
        dev_rows = load_tsv(data_dir / "dev.tsv")
        if tc.eval_sentences:
            dev_rows = dev_rows[: tc.eval_sentences]
        self.dev_rows = dev_rows
        self.dev_data = encode_pairs(self.tokenizer, dev_rows, max_len)
        self.model = build_model(config.model).to(self.device)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=tc.lr, betas=(0.9, 0.98), eps=1e-9, weight_decay=tc.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, inverse_sqrt_schedule(tc.warmup_steps))
        self.autocast = self.device.type == "cuda" and tc.amp
        self.step = self.epoch = self.batch_in_epoch = self.bad_evals = 0
        self.best_bleu = -1.0
        self.train_seconds = 0.0
        self.stop_requested = False
        log.info("%s: %s parameters on %s, %d train / %d dev pairs", config.model.label,
                 f"{self.model.num_parameters():,}", self.device, len(self.train_data), len(self.dev_data))

    # -- setup -------------------------------------------------------------------------------

    def _tokenizer(self) -> Tokenizer:
        path = self.run_dir / "spm.model"
        if not path.is_file():
            rows = load_tsv(Path(self.config.train.data_dir) / "train.tsv")
            train_tokenizer((text for row in rows for text in row), path, self.config.model.vocab_size)
        return Tokenizer(path)

    def resume(self) -> bool:
        last = self.run_dir / "checkpoints" / "last"
        if not (last / "trainer.pt").is_file():
            return False
        import safetensors.torch

        safetensors.torch.load_model(self.model, str(last / "model.safetensors"), device=str(self.device))
        state = load_trainer_state(last)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        for name in ("step", "epoch", "batch_in_epoch", "best_bleu", "bad_evals", "train_seconds"):
            setattr(self, name, state[name])
        log.info("resumed from step %d (epoch %d, batch %d, best dev BLEU %.2f)",
                 self.step, self.epoch, self.batch_in_epoch, self.best_bleu)
        return True

    # -- checkpoints and evaluation ----------------------------------------------------------

    def _meta(self, bleu: float | None = None) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "dev_bleu": bleu, "best_dev_bleu": self.best_bleu,
                "train_seconds": round(self.train_seconds, 1), "model": self.config.model.label}

    def save_last(self) -> None:
        trainer = {
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "rng": torch.get_rng_state(), "step": self.step, "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch, "best_bleu": self.best_bleu,
            "bad_evals": self.bad_evals, "train_seconds": self.train_seconds,
        }
        save_checkpoint(self.run_dir / "checkpoints" / "last", self.model, self._meta(), trainer)

    def log_metrics(self, record: dict[str, Any]) -> None:
        with open(self.run_dir / "log.jsonl", "a") as f:
            f.write(json.dumps({"time": round(time.time(), 1), "step": self.step, "epoch": self.epoch, **record}) + "\n")

    @torch.inference_mode()
    def dev_loss(self) -> float:
        self.model.eval()
        total, tokens = 0.0, 0
        for batch in token_batches([max(len(s), len(t) + 1) for s, t in self.dev_data], self.config.train.max_tokens):
            src, tgt_in, tgt_out = (x.to(self.device) for x in collate([self.dev_data[i] for i in batch]))
            logits = self.model(src, tgt_in)
            total += F.cross_entropy(logits.flatten(0, 1).float(), tgt_out.flatten(), ignore_index=PAD_ID, reduction="sum").item()
            tokens += int((tgt_out != PAD_ID).sum())
        return total / max(tokens, 1)

    def evaluate(self) -> float:
        """Dev loss and greedy dev BLEU; keeps the best checkpoint; returns BLEU."""
        loss = self.dev_loss()
        hyps = translate_best(self.model, self.tokenizer, [s for s, _ in self.dev_rows], DecodeOptions())
        bleu = sacrebleu.corpus_bleu(hyps, [[t for _, t in self.dev_rows]]).score
        self.model.train()
        improved = bleu > self.best_bleu
        if improved:
            self.best_bleu, self.bad_evals = bleu, 0
            save_checkpoint(self.run_dir / "checkpoints" / "best", self.model, self._meta(bleu))
        else:
            self.bad_evals += 1
        self.log_metrics({"dev_loss": round(loss, 4), "dev_bleu": round(bleu, 2), "best": improved,
                          "train_seconds": round(self.train_seconds, 1)})
        log.info("step %d: dev loss %.3f, dev BLEU %.2f%s", self.step, loss, bleu, " (best)" if improved else "")
        return bleu

    # -- the loop ----------------------------------------------------------------------------

    def train_step(self, examples: list[Example]) -> tuple[float, int]:
        tc = self.config.train
        src, tgt_in, tgt_out = (x.to(self.device) for x in collate(examples))
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            logits = self.model(src, tgt_in)  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tgt_out.flatten(),
                               ignore_index=PAD_ID, label_smoothing=tc.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.clip_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return loss.item(), int((tgt_out != PAD_ID).sum())

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

    def train(self) -> str:
        tc = self.config.train
        lengths = [max(len(s), len(t) + 1) for s, t in self.train_data]
        self.model.train()
        interactive = sys.stderr.isatty()
        bar = tqdm(initial=self.step, total=tc.max_steps or None, unit="step", dynamic_ncols=True,
                   mininterval=0.5 if interactive else 30, disable=None if interactive else False)
        reason = self.out_of_budget()
        while reason is None:
            batches = token_batches(lengths, tc.max_tokens, seed=tc.seed * 1000 + self.epoch)
            while self.batch_in_epoch < len(batches) and reason is None:
                start = time.perf_counter()
                loss, tokens = self.train_step([self.train_data[i] for i in batches[self.batch_in_epoch]])
                self.batch_in_epoch += 1
                seconds = time.perf_counter() - start
                self.train_seconds += seconds
                bar.update(1)
                bar.set_postfix(epoch=self.epoch, loss=f"{loss:.3f}", tok_s=f"{tokens / seconds:.0f}",
                                lr=f"{self.scheduler.get_last_lr()[0]:.1e}", refresh=False)
                if self.step % 100 == 0:
                    self.log_metrics({"train_loss": round(loss, 4), "lr": self.scheduler.get_last_lr()[0],
                                      "tokens_per_s": round(tokens / seconds)})
                if self.step % tc.eval_every == 0:
                    self.evaluate()
                    self.save_last()
                reason = self.out_of_budget()
            if self.batch_in_epoch >= len(batches):
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                reason = self.out_of_budget()
        bar.close()
        if self.step % tc.eval_every:
            self.evaluate()
        self.save_last()
        self.log_metrics({"stopped": reason})
        log.info("stopped after %d steps (%s); best dev BLEU %.2f", self.step, reason, self.best_bleu)
        return reason


def run_training(config: Config, run_dir: Path | None = None, resume: bool = True) -> Trainer:
    """Train (or resume) a run. An existing run directory keeps its own config."""
    run_dir = Path(run_dir or config.train.out_dir)
    if (run_dir / "config.json").is_file() and resume:
        saved = read_config(run_dir)
        saved.train.time_limit_min = config.train.time_limit_min  # budgets may change on resume
        saved.train.max_steps = config.train.max_steps
        saved.train.max_epochs = config.train.max_epochs
        saved.train.threads = config.train.threads
        config = saved
    trainer = Trainer(config, run_dir)
    write_config(run_dir, config)
    if resume:
        trainer.resume()

    def request_stop(signum, frame):
        log.warning("signal %d: stopping after this step with a checkpoint", signum)
        trainer.stop_requested = True

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        trainer.train()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return trainer
