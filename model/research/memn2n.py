"""End-to-end memory networks (Sukhbaatar et al. 2015, "End-To-End Memory Networks") and an LSTM
baseline on the bAbI-style tasks of attnserve.model.research.babi.

One hop k reads the memory with the controller state u^k:

    m_i = sum_j l_j * A^k x_ij + T_A^k(i)      c_i = sum_j l_j * C^k x_ij + T_C^k(i)
    p_i = softmax_i(u^k . m_i)  over the valid memories (padding gets exactly 0)
    o^k = sum_i p_i c_i         u^{k+1} = u^k + o^k   (layer-wise tying: u^{k+1} = H u^k + o^k)

with u^1 = sum_j l_j * B q_j and the answer a = softmax(W (o^K + u^K)) = softmax(W u^{K+1}).

* Position encoding (PE): l_kj = (1 - j/J) - (k/d)(1 - 2j/J), J the sentence's length (section 4.1).
* Temporal encoding (TE): T_A(i), T_C(i) learned per slot, i = 0 the most recent sentence.
* Random noise (RN): in training, 10% empty memories are added to the stories. As in the authors'
  Matlab code, an empty memory is a gap in time: each story gets 0..ceil(0.1 n) blanks at random
  places, which shift the temporal indices of the older sentences; a blank holds no words and is
  not a key of the attention.
* Linear start (LS): training starts with the softmax of every hop removed (p_i = u . m_i, the
  model linear up to the answer softmax) at lr 0.005; when the validation loss stops falling the
  softmax is re-inserted and training recommences at lr 0.01.
* Weight tying: adjacent (A^{k+1} = C^k, B = A^1, W^T = C^K; T likewise), or layer-wise
  (A^1 = ... = A^K, C^1 = ... = C^K, a linear map H between hops, separate B and W).
* Training (section 4.2): SGD, lr 0.01 halved every 25 epochs, gradients clipped to norm 40,
  batch 32, weights N(0, 0.1), d = 20, 10% of the training questions held out for validation; the
  loss is summed over the batch as in the authors' code. The paper trains 100 epochs (plus the LS
  phase) and keeps the best of 10 random restarts by training error; `--restarts` does the same.
* The null word's embedding is kept at zero (padding_idx).

Two options that are not the paper's defaults, for the yes/no task (6): `--ls-fixed` runs all
`--ls-epochs` of linear start instead of stopping at the first epoch whose validation loss does not
fall (with 100 validation questions that is often epoch 2), and `--null-memory` adds one
always-present empty memory with score 0 and output 0. Padding here gets exactly zero attention, so
without it the softmax has no reference point and p carries no information about how well the best
memory matched; implementations that pad the memory with nil sentences inside the softmax have
such sinks implicitly.

The LSTM baseline (Weston et al. 2015's "LSTM" column) reads the memory's sentences, oldest first,
and then the question as one token sequence; its last hidden state predicts the answer word. It is
trained on the same questions with Adam (lr 1e-3, batch 32, clipping 40) and the test accuracy of its
best validation epoch is reported (a setting that favours the baseline).

CLI:
    python -m attnserve.model.research.memn2n --task 1 --size 1k --model memn2n --hops 3 \\
        --epochs 100 --seed 0 --out runs/memn2n/t1-1k.json
    python -m attnserve.model.research.memn2n table --size 1k --out runs/memn2n/table-1k.json
    python -m attnserve.model.research.memn2n figure --table runs/memn2n/table-1k.json \\
        --out docs/zoo-memn2n-hops.png
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from attnserve.model.hardware import cpu_info
from attnserve.model.research.babi import MEMORY, SIZES, TASKS, Question, load, tokens

PAD = 0


# ----------------------------------------------------------------------------------------- data


class Vocab:
    """Words of the stories, questions and answers; id 0 is the null (padding) word."""

    def __init__(self, words: set[str]) -> None:
        self.words = ["<nil>", *sorted(words)]
        self.index = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def of(cls, *splits: list[Question]) -> "Vocab":
        words: set[str] = set()
        for split in splits:
            for q in split:
                for sentence in q.memory()[0]:
                    words.update(tokens(sentence))
                words.update(tokens(q.question))
                words.add(q.answer)
        return cls(words)

    def __len__(self) -> int:
        return len(self.words)

    def ids(self, sentence: str) -> list[int]:
        return [self.index[w] for w in tokens(sentence)]


@dataclass
class Encoded:
    """Questions as arrays. Memory slot 0 is the most recent sentence (temporal index 0)."""

    stories: np.ndarray  # (N, MEMORY, J) word ids
    lengths: np.ndarray  # (N, MEMORY) words per sentence, 0 for an empty slot
    n_mem: np.ndarray  # (N,) sentences in memory
    query: np.ndarray  # (N, Jq)
    qlen: np.ndarray  # (N,)
    answer: np.ndarray  # (N,)
    support: np.ndarray  # (N, MEMORY) bool: the slot is a supporting fact
    seq: np.ndarray  # (N, L) the LSTM's input: memory sentences oldest first, then the question
    seqlen: np.ndarray  # (N,)

    def __len__(self) -> int:
        return len(self.answer)

    def take(self, idx: np.ndarray) -> "Encoded":
        return Encoded(*(getattr(self, f.name)[idx] for f in fields(self)))


def encode(questions: list[Question], vocab: Vocab, memory: int = MEMORY) -> Encoded:
    mems = [q.memory(memory) for q in questions]
    J = max(len(tokens(s)) for sentences, _ in mems for s in sentences)
    Jq = max(len(tokens(q.question)) for q in questions)
    L = max(sum(len(tokens(s)) for s in sentences) + len(tokens(q.question)) for q, (sentences, _) in zip(questions, mems))
    N = len(questions)
    out = Encoded(
        stories=np.zeros((N, memory, J), np.int64), lengths=np.zeros((N, memory), np.int64), n_mem=np.zeros(N, np.int64),
        query=np.zeros((N, Jq), np.int64), qlen=np.zeros(N, np.int64), answer=np.zeros(N, np.int64),
        support=np.zeros((N, memory), bool), seq=np.zeros((N, L), np.int64), seqlen=np.zeros(N, np.int64),
    )
    for n, (q, (sentences, support)) in enumerate(zip(questions, mems)):
        out.n_mem[n] = len(sentences)
        seq: list[int] = []
        for i, sentence in enumerate(sentences):
            ids = vocab.ids(sentence)
            slot = len(sentences) - 1 - i  # reverse time: slot 0 = the most recent sentence
            out.stories[n, slot, : len(ids)] = ids
            out.lengths[n, slot] = len(ids)
            seq += ids
        for i in support:
            out.support[n, len(sentences) - 1 - i] = True
        ids = vocab.ids(q.question)
        out.query[n, : len(ids)], out.qlen[n] = ids, len(ids)
        seq += ids
        out.seq[n, : len(seq)], out.seqlen[n] = seq, len(seq)
        out.answer[n] = vocab.index[q.answer]
    return out


def memory_batch(data: Encoded, idx: np.ndarray, rn: float = 0.0, rng: np.random.Generator | None = None) -> dict[str, torch.Tensor]:
    """Tensors of one batch, memory trimmed to the batch's longest; `rn` > 0 adds blanks in time."""
    S = max(1, int(data.n_mem[idx].max()))
    n_mem = data.n_mem[idx]
    when = np.tile(np.arange(S), (len(idx), 1))
    if rn > 0:
        assert rng is not None
        for b, n in enumerate(n_mem):
            blanks = int(rng.integers(0, math.ceil(rn * n) + 1))
            when[b, :n] = np.sort(rng.permutation(n + blanks)[:n])
    return {
        "stories": torch.from_numpy(data.stories[idx, :S]),
        "lengths": torch.from_numpy(data.lengths[idx, :S]),
        "time": torch.from_numpy(np.minimum(when, MEMORY - 1)),
        "mask": torch.from_numpy(np.arange(S)[None, :] < n_mem[:, None]),
        "query": torch.from_numpy(data.query[idx]),
        "qlen": torch.from_numpy(data.qlen[idx]),
    }


def sequence_batch(data: Encoded, idx: np.ndarray) -> dict[str, torch.Tensor]:
    L = int(data.seqlen[idx].max())
    return {"seq": torch.from_numpy(data.seq[idx, :L]), "seqlen": torch.from_numpy(data.seqlen[idx])}


# --------------------------------------------------------------------------------------- models


def position_encoding(max_words: int, dim: int) -> torch.Tensor:
    """(max_words + 1, max_words, dim): row J holds l_kj = (1 - j/J) - (k/d)(1 - 2j/J) for j <= J."""
    table = torch.zeros(max_words + 1, max_words, dim)
    k = torch.arange(1, dim + 1, dtype=torch.float32) / dim
    for J in range(1, max_words + 1):
        j = torch.arange(1, J + 1, dtype=torch.float32)[:, None] / J
        table[J, :J] = (1 - j) - k[None, :] * (1 - 2 * j)
    return table


class MemN2N(nn.Module):
    def __init__(self, vocab_size: int, dim: int = 20, hops: int = 3, max_words: int = 16, memory: int = MEMORY,
                 tying: str = "adjacent", pe: bool = True, te: bool = True, null_memory: bool = False) -> None:
        super().__init__()
        self.null_memory = null_memory  # an always-present empty memory (score 0, output 0): a sink
        if tying not in ("adjacent", "layerwise"):
            raise ValueError(f"tying {tying!r}: adjacent or layerwise")
        self.hops, self.tying, self.use_pe, self.use_te = hops, tying, pe, te
        self.softmax = True  # False during linear start
        n_emb, n_time = (hops + 1, hops + 1) if tying == "adjacent" else (4, 2)  # layerwise: B, A, C, W; T_A, T_C
        self.emb = nn.ModuleList(nn.Embedding(vocab_size, dim, padding_idx=PAD) for _ in range(n_emb))
        self.time = nn.ParameterList(nn.Parameter(torch.empty(memory, dim)) for _ in range(n_time))
        self.H = nn.Linear(dim, dim, bias=False) if tying == "layerwise" else None
        for p in self.parameters():
            nn.init.normal_(p, std=0.1)
        with torch.no_grad():
            for e in self.emb:
                e.weight[PAD].zero_()
        self.register_buffer("pe", position_encoding(max_words, dim), persistent=False)

    # A^k, C^k, T_A^k, T_C^k for hop k = 0..K-1, B and W
    def _A(self, k: int) -> nn.Embedding:
        return self.emb[k] if self.tying == "adjacent" else self.emb[1]

    def _C(self, k: int) -> nn.Embedding:
        return self.emb[k + 1] if self.tying == "adjacent" else self.emb[2]

    def _TA(self, k: int) -> torch.Tensor:
        return self.time[k] if self.tying == "adjacent" else self.time[0]

    def _TC(self, k: int) -> torch.Tensor:
        return self.time[k + 1] if self.tying == "adjacent" else self.time[1]

    def answer_weight(self) -> torch.Tensor:  # W (V, d); adjacent: W^T = C^K
        return self.emb[self.hops].weight if self.tying == "adjacent" else self.emb[3].weight

    def embed(self, emb: nn.Embedding, words: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Sentences (..., J) -> (..., d): PE-weighted (or plain) sum of word embeddings."""
        e = emb(words)
        if self.use_pe:
            e = e * self.pe[lengths][..., : words.shape[-1], :]
        return e.sum(-2)

    def forward(self, stories: torch.Tensor, lengths: torch.Tensor, time: torch.Tensor, mask: torch.Tensor,
                query: torch.Tensor, qlen: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Answer logits (B, V) and the attention p of every hop (B, S), or (B, S + 1) with the null memory last."""
        u = self.embed(self.emb[0], query, qlen)
        attention = []
        for k in range(self.hops):
            m = self.embed(self._A(k), stories, lengths)
            c = self.embed(self._C(k), stories, lengths)
            if self.use_te:
                m, c = m + self._TA(k)[time], c + self._TC(k)[time]
            scores = torch.einsum("bsd,bd->bs", m, u)
            if self.null_memory:  # the extra slot is valid, scores exactly 0 and contributes nothing to o
                scores = torch.cat([scores, scores.new_zeros(len(scores), 1)], 1)
                mask = torch.cat([mask, mask.new_ones(len(mask), 1)], 1) if mask.shape[1] == m.shape[1] else mask
                c = torch.cat([c, c.new_zeros(len(c), 1, c.shape[-1])], 1)
            if self.softmax:
                p = scores.masked_fill(~mask, float("-inf")).softmax(-1)
            else:
                p = scores * mask  # linear start: no softmax, padding still 0
            o = torch.einsum("bs,bsd->bd", p, c)
            u = (self.H(u) if self.H is not None else u) + o
            attention.append(p)
        return u @ self.answer_weight().T, attention


class LSTMBaseline(nn.Module):
    def __init__(self, vocab_size: int, dim: int = 50, hidden: int = 100) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab_size, dim, padding_idx=PAD)
        self.lstm = nn.LSTM(dim, hidden, batch_first=True)
        self.out = nn.Linear(hidden, vocab_size)

    def forward(self, seq: torch.Tensor, seqlen: torch.Tensor) -> torch.Tensor:
        packed = nn.utils.rnn.pack_padded_sequence(self.emb(seq), seqlen, batch_first=True, enforce_sorted=False)
        _, (h, _) = self.lstm(packed)
        return self.out(h[-1])


# ------------------------------------------------------------------------------------- training


@dataclass
class RunConfig:
    task: int = 1
    size: str = "1k"
    model: str = "memn2n"  # memn2n | lstm
    hops: int = 3
    dim: int = 20
    epochs: int = 100  # after the linear start phase
    ls_epochs: int = 20  # the most epochs of linear start (the authors' code: 20)
    lr: float = 0.01
    ls_lr: float = 0.005
    ls_until_plateau: bool = True  # False: always run all ls_epochs of linear start
    decay_every: int = 25
    clip: float = 40.0
    batch: int = 32
    seed: int = 0
    data_seed: int = 0
    pe: bool = True
    te: bool = True
    ls: bool = True
    rn: float = 0.1
    tying: str = "adjacent"
    null_memory: bool = False  # not in the paper: see the module docstring
    restarts: int = 1
    valid_fraction: float = 0.1
    lstm_dim: int = 50
    lstm_hidden: int = 100
    lstm_lr: float = 1e-3
    lstm_epochs: int | None = None  # default: epochs


def _batches(n: int, batch: int, rng: np.random.Generator) -> list[np.ndarray]:
    order = rng.permutation(n)
    return [order[i : i + batch] for i in range(0, n, batch)]


@torch.no_grad()
def evaluate_memn2n(model: MemN2N, data: Encoded, batch: int = 500) -> dict[str, Any]:
    """Loss (mean), accuracy, predictions and, per hop, how often the most attended memory is a
    supporting fact ("all": every supporting fact is the top memory of some hop)."""
    model.eval()
    loss, preds, top = 0.0, [], []
    for start in range(0, len(data), batch):
        idx = np.arange(start, min(start + batch, len(data)))
        batch_ = memory_batch(data, idx)
        logits, attention = model(**batch_)
        target = torch.from_numpy(data.answer[idx])
        loss += F.cross_entropy(logits, target, reduction="sum").item()
        preds.append(logits.argmax(-1).numpy())
        S = batch_["mask"].shape[1]  # the null memory, if any, is the last column
        top.append(torch.stack([p[:, :S].argmax(-1) for p in attention], 1).numpy())  # (B, K)
    model.train()
    preds_a, top_a = np.concatenate(preds), np.concatenate(top)
    hit = np.take_along_axis(data.support, top_a, axis=1)  # (N, K): the hop's top memory is a supporting fact
    covered = np.array([set(np.flatnonzero(s)) <= set(t) for s, t in zip(data.support, top_a)])
    rates = {f"hop{k + 1}": float(hit[:, k].mean()) for k in range(top_a.shape[1])}
    rates |= {"any": float(hit.any(1).mean()), "all": float(covered.mean())}
    return {"loss": loss / len(data), "accuracy": float((preds_a == data.answer).mean()), "pred": preds_a, "support_rate": rates}


def train_memn2n(train: Encoded, valid: Encoded, vocab: Vocab, cfg: RunConfig, seed: int, log=print) -> tuple[MemN2N, dict[str, Any]]:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    max_words = int(max(train.stories.shape[-1], valid.stories.shape[-1], train.query.shape[-1], 1))
    model = MemN2N(len(vocab), cfg.dim, cfg.hops, max(max_words, 16), MEMORY, cfg.tying, cfg.pe, cfg.te, cfg.null_memory)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)

    def epoch(lr: float) -> float:
        for group in opt.param_groups:
            group["lr"] = lr
        total = 0.0
        for idx in _batches(len(train), cfg.batch, rng):
            logits, _ = model(**memory_batch(train, idx, cfg.rn, rng))
            loss = F.cross_entropy(logits, torch.from_numpy(train.answer[idx]), reduction="sum")
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            opt.step()
            total += loss.item()
        return total / len(train)

    history: dict[str, Any] = {"ls_epochs": 0, "curve": []}
    if cfg.ls and cfg.ls_epochs > 0:
        model.softmax = False
        best = math.inf
        for e in range(cfg.ls_epochs):
            train_loss = epoch(cfg.ls_lr)
            valid_loss = evaluate_memn2n(model, valid)["loss"]
            history["curve"].append({"phase": "ls", "epoch": e + 1, "train_loss": train_loss, "valid_loss": valid_loss})
            history["ls_epochs"] = e + 1
            if cfg.ls_until_plateau and (not math.isfinite(valid_loss) or valid_loss >= best):
                break  # validation loss stopped falling: re-insert the softmax
            best = valid_loss
        model.softmax = True
    for e in range(cfg.epochs):
        train_loss = epoch(cfg.lr * 0.5 ** (e // cfg.decay_every))
        if (e + 1) % 10 == 0 or e + 1 == cfg.epochs:
            v = evaluate_memn2n(model, valid)
            history["curve"].append({"phase": "main", "epoch": e + 1, "train_loss": train_loss, "valid_loss": v["loss"], "valid_accuracy": v["accuracy"]})
            log(f"  epoch {e + 1}: train loss {train_loss:.3f}, valid loss {v['loss']:.3f}, valid acc {v['accuracy']:.3f}")
    return model, history


@torch.no_grad()
def evaluate_lstm(model: LSTMBaseline, data: Encoded, batch: int = 500) -> dict[str, Any]:
    model.eval()
    loss, preds = 0.0, []
    for start in range(0, len(data), batch):
        idx = np.arange(start, min(start + batch, len(data)))
        logits = model(**sequence_batch(data, idx))
        loss += F.cross_entropy(logits, torch.from_numpy(data.answer[idx]), reduction="sum").item()
        preds.append(logits.argmax(-1).numpy())
    model.train()
    p = np.concatenate(preds)
    return {"loss": loss / len(data), "accuracy": float((p == data.answer).mean()), "pred": p}


def train_lstm(train: Encoded, valid: Encoded, vocab: Vocab, cfg: RunConfig, seed: int, log=print) -> tuple[LSTMBaseline, dict[str, Any]]:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = LSTMBaseline(len(vocab), cfg.lstm_dim, cfg.lstm_hidden)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lstm_lr)
    best, best_state, curve = -1.0, None, []
    epochs = cfg.lstm_epochs if cfg.lstm_epochs is not None else cfg.epochs
    for e in range(epochs):
        total = 0.0
        for idx in _batches(len(train), cfg.batch, rng):
            loss = F.cross_entropy(model(**sequence_batch(train, idx)), torch.from_numpy(train.answer[idx]))
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            opt.step()
            total += loss.item() * len(idx)
        v = evaluate_lstm(model, valid)
        curve.append({"epoch": e + 1, "train_loss": total / len(train), "valid_loss": v["loss"], "valid_accuracy": v["accuracy"]})
        if v["accuracy"] > best:
            best, best_state = v["accuracy"], copy.deepcopy(model.state_dict())
        if (e + 1) % 5 == 0 or e + 1 == epochs:
            log(f"  epoch {e + 1}: train loss {total / len(train):.3f}, valid acc {v['accuracy']:.3f}")
    if best_state is not None:
        model.load_state_dict(best_state)
    return model, {"curve": curve, "best_valid_epoch": int(np.argmax([c["valid_accuracy"] for c in curve]) + 1) if curve else 0}


def _examples(model: MemN2N, questions: list[Question], data: Encoded, preds: np.ndarray, vocab: Vocab, count: int = 3) -> list[dict]:
    """A few test questions with short memories and their per-hop attention, for the figure."""
    chosen = [n for n in range(len(questions)) if 4 <= data.n_mem[n] <= 14][:count]
    if not chosen:
        chosen = list(range(min(count, len(questions))))
    out = []
    with torch.no_grad():
        _, attention = model(**memory_batch(data, np.array(chosen)))
    for b, n in enumerate(chosen):
        sentences, support = questions[n].memory()
        k = len(sentences)
        # slot s holds sentence k-1-s; report oldest first
        hops = [[float(p[b, k - 1 - i]) for i in range(k)] for p in attention]
        out.append({"index": n, "story": list(sentences), "question": questions[n].question, "answer": questions[n].answer,
                    "predicted": vocab.words[int(preds[n])], "support": list(support), "attention": hops})
    return out


def hardware() -> str:
    return cpu_info()["model"]


def run(cfg: RunConfig, log=print) -> dict[str, Any]:
    """Train one model on one task (best of `restarts` by training error), evaluate on test."""
    torch.set_num_threads(1)
    wall, cpu = time.perf_counter(), time.process_time()
    splits = load(cfg.task, cfg.size, cfg.data_seed)
    vocab = Vocab.of(splits["train"], splits["test"])
    everything = encode(splits["train"] + splits["test"], vocab)  # one padding shape for all splits
    n_train_all = len(splits["train"])
    n_valid = int(round(cfg.valid_fraction * n_train_all))
    split_rng = np.random.default_rng(cfg.data_seed)
    order = split_rng.permutation(n_train_all)
    valid_idx, train_idx = np.sort(order[:n_valid]), np.sort(order[n_valid:])
    train, valid = everything.take(train_idx), everything.take(valid_idx)
    test = everything.take(np.arange(n_train_all, len(everything)))
    log(f"task {cfg.task} ({TASKS[cfg.task]}), {cfg.size}: {len(train)} train, {len(valid)} valid, {len(test)} test, vocab {len(vocab)}")

    restarts = []
    best = None
    for r in range(cfg.restarts):
        seed = cfg.seed * 1000 + r
        log(f" {cfg.model} restart {r} (seed {seed})")
        if cfg.model == "memn2n":
            model, history = train_memn2n(train, valid, vocab, cfg, seed, log)
            train_eval = evaluate_memn2n(model, train)
        elif cfg.model == "lstm":
            model, history = train_lstm(train, valid, vocab, cfg, seed, log)
            train_eval = evaluate_lstm(model, train)
        else:
            raise ValueError(f"model {cfg.model!r}: memn2n or lstm")
        restarts.append({"seed": seed, "train_error": 1 - train_eval["accuracy"], "history": history})
        if best is None or train_eval["accuracy"] > best[2]["accuracy"]:
            best = (model, history, train_eval, seed)
    assert best is not None
    model, history, train_eval, seed = best
    if cfg.model == "memn2n":
        valid_eval, test_eval = evaluate_memn2n(model, valid), evaluate_memn2n(model, test)
    else:
        valid_eval, test_eval = evaluate_lstm(model, valid), evaluate_lstm(model, test)
    result: dict[str, Any] = {
        "task": cfg.task, "task_name": TASKS[cfg.task], "size": cfg.size, "model": cfg.model, "config": asdict(cfg),
        "n_train": len(train), "n_valid": len(valid), "n_test": len(test), "vocab": len(vocab),
        "chosen_seed": seed,
        "train_accuracy": train_eval["accuracy"], "valid_accuracy": valid_eval["accuracy"],
        "test_accuracy": test_eval["accuracy"], "test_error_percent": 100 * (1 - test_eval["accuracy"]),
        "restarts": restarts,
    }
    if cfg.model == "memn2n":
        result["supporting_fact_rate"] = test_eval["support_rate"]
        result["ls_epochs"] = history["ls_epochs"]
        result["examples"] = _examples(model, splits["test"], test, test_eval["pred"], vocab)
    result["wall_s"] = time.perf_counter() - wall
    result["cpu_s"] = time.process_time() - cpu
    result["hardware"] = hardware()
    result["torch_threads"] = torch.get_num_threads()
    log(f" -> test accuracy {test_eval['accuracy']:.3f} (error {result['test_error_percent']:.1f}%), "
        f"{result['wall_s']:.0f} s wall, {result['cpu_s']:.0f} s CPU")
    return result


# ------------------------------------------------------------------------------------------ CLI


def _config_args(p: argparse.ArgumentParser, table: bool = False) -> None:
    if not table:
        p.add_argument("--task", type=int, default=1, choices=sorted(TASKS))
        p.add_argument("--model", default="memn2n", choices=["memn2n", "lstm"])
    p.add_argument("--size", default="1k", choices=sorted(SIZES))
    p.add_argument("--hops", type=int, default=3)
    p.add_argument("--dim", type=int, default=20)
    p.add_argument("--epochs", type=int, default=100, help="epochs after linear start (the paper: 100)")
    p.add_argument("--ls-epochs", type=int, default=20, help="the most epochs of linear start")
    p.add_argument("--decay-every", type=int, default=25, help="halve the learning rate every this many epochs")
    p.add_argument("--lstm-epochs", type=int, default=None, help="LSTM epochs (default: --epochs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--restarts", type=int, default=1)
    p.add_argument("--tying", default="adjacent", choices=["adjacent", "layerwise"])
    p.add_argument("--no-pe", action="store_true")
    p.add_argument("--no-te", action="store_true")
    p.add_argument("--no-ls", action="store_true")
    p.add_argument("--ls-fixed", action="store_true", help="run all --ls-epochs of linear start (no plateau test)")
    p.add_argument("--null-memory", action="store_true", help="add one always-present empty memory (not in the paper)")
    p.add_argument("--rn", type=float, default=0.1, help="fraction of empty memories added in training (0: no RN)")
    p.add_argument("--out", type=Path, required=True)


def _config(a: argparse.Namespace, task: int, model: str) -> RunConfig:
    return RunConfig(task=task, size=a.size, model=model, hops=a.hops, dim=a.dim, epochs=a.epochs, ls_epochs=a.ls_epochs, decay_every=a.decay_every,
                     lstm_epochs=a.lstm_epochs, seed=a.seed, data_seed=a.data_seed, restarts=a.restarts, tying=a.tying,
                     pe=not a.no_pe, te=not a.no_te, ls=not a.no_ls, rn=a.rn,
                     ls_until_plateau=not a.ls_fixed, null_memory=a.null_memory)


def _write(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1) + "\n")


def figure(table: Path | list[Path], out: Path, tasks: list[int] | None = None) -> Path:
    """Per-hop attention over the story for one test question of each task (supporting facts marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for path in [table] if isinstance(table, Path) else table:
        rows += json.loads(Path(path).read_text())["rows"]
    picks = []
    for task in tasks or [2, 3, 11]:
        for row in rows:
            if row["model"] == "memn2n" and row["task"] == task and row.get("examples"):
                picks.append((row, row["examples"][0]))
                break
    if not picks:
        raise SystemExit("no memn2n examples in the table")
    heights = [len(ex["story"]) + 2.5 for _, ex in picks]
    fig, axes = plt.subplots(len(picks), 1, figsize=(7.2, 0.24 * sum(heights) + 0.6), gridspec_kw={"height_ratios": heights})
    axes = np.atleast_1d(axes)
    for ax, (row, ex) in zip(axes, picks):
        att = np.array(ex["attention"]).T  # (sentences, hops)
        ax.imshow(att, cmap="Blues", vmin=0, vmax=1, aspect="auto")
        labels = [("* " if i in ex["support"] else "") + s for i, s in enumerate(ex["story"])]
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        for i in ex["support"]:
            ax.get_yticklabels()[i].set_fontweight("bold")
            ax.get_yticklabels()[i].set_color("#b2182b")
        ax.set_xticks(range(att.shape[1]), [f"hop {k + 1}" for k in range(att.shape[1])], fontsize=7)
        ax.xaxis.tick_top()
        for i in range(att.shape[0]):
            for k in range(att.shape[1]):
                ax.text(k, i, f"{att[i, k]:.2f}", ha="center", va="center", fontsize=6, color="white" if att[i, k] > 0.5 else "black")
        ax.set_xlabel(f"task {row['task']} ({row['size']}): {ex['question']}  answer: {ex['answer']}, predicted: {ex['predicted']}",
                      fontsize=7.5)
    fig.suptitle("MemN2N (PE LS RN, 3 hops, adjacent tying): attention per hop; * = supporting fact", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(1)
    if argv and argv[0] == "table":
        p = argparse.ArgumentParser(prog="memn2n table", description="every task for both models into one JSON")
        _config_args(p, table=True)
        p.add_argument("--tasks", type=int, nargs="+", default=sorted(TASKS))
        p.add_argument("--models", nargs="+", default=["memn2n", "lstm"], choices=["memn2n", "lstm"])
        a = p.parse_args(argv[1:])
        table: dict[str, Any] = {"command": "python -m attnserve.model.research.memn2n " + " ".join(argv), "size": a.size,
                                 "hardware": hardware(), "rows": []}
        for task in a.tasks:
            for model in a.models:
                table["rows"].append(run(_config(a, task, model)))
                _write(a.out, table)  # after every row: a partial table survives an interruption
        table["total_wall_s"] = sum(r["wall_s"] for r in table["rows"])
        table["total_cpu_s"] = sum(r["cpu_s"] for r in table["rows"])
        _write(a.out, table)
        for r in table["rows"]:
            print(f"task {r['task']:2d} {r['model']:7s} test error {r['test_error_percent']:5.1f}%  ({r['cpu_s']:.0f} s CPU)")
        return 0
    if argv and argv[0] == "figure":
        p = argparse.ArgumentParser(prog="memn2n figure")
        p.add_argument("--table", type=Path, nargs="+", required=True)
        p.add_argument("--tasks", type=int, nargs="+", default=[2, 3, 11])
        p.add_argument("--out", type=Path, default=Path("docs/zoo-memn2n-hops.png"))
        a = p.parse_args(argv[1:])
        print(figure(a.table, a.out, a.tasks))
        return 0
    p = argparse.ArgumentParser(prog="memn2n", description=__doc__.split("\n")[0])
    _config_args(p)
    a = p.parse_args(argv)
    result = run(_config(a, a.task, a.model))
    result["command"] = "python -m attnserve.model.research.memn2n " + " ".join(argv)
    _write(a.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
