"""Feed-forward attention (Raffel & Ellis 2015, "Feed-Forward Networks with Attention Can Solve
Some Long-Term Memory Problems") on Hochreiter & Schmidhuber's addition and multiplication tasks,
against a GRU and a dense layer over the flattened sequence.

    h_t     = f(W_h x_t + b_h)               the same small layer at every step     (B, T, D)
    e_t     = v^T tanh(W_a h_t + b_a)        one score per step                     (B, T)
    alpha   = softmax(e) over valid steps    padding gets exactly 0                 (B, T)
    c       = sum_t alpha_t h_t              one vector for the whole sequence      (B, D)
    y       = g(c)                           an MLP to one number                   (B,)

f and g use leaky ReLU and every hidden layer has D = 100 units, as in the paper. The paper's own
score is a(h) = tanh(w^T h + b) (one unit); `score="paper"` selects it, the default is the
two-layer v^T tanh(W h + b) of Bahdanau et al.

The task generator follows the authors' released generator (craffel/lstm_problems, which
their craffel/ff-attention scripts import), i.e. Hochreiter & Schmidhuber 1997 sections 5.4/5.5:
each sequence has length L drawn from [T, ceil(1.1 T)), steps are (value, marker) pairs,
markers are -1 at the first and last step, 1 at N1 in [1, 10) and at N2 in [1, L/2 - 1) (N2 != N1),
0 elsewhere. Addition: values U[-1, 1], target 0.5 + (x_N1 + x_N2) / 4 (the sum rescaled to
[0, 1]). Multiplication: values U[0, 1], target x_N1 * x_N2. "Solved" is test MSE < 0.01.

    python -m attnserve.model.research.feedforward --task addition --length 100 --model attention \\
        --max-steps 300 --seed 0 --out runs/ffattn/add-100-attention.json
    python -m attnserve.model.research.feedforward sweep --tasks addition multiplication \\
        --lengths 50 100 500 1000 --models attention --max-steps 300 --eval-every 10 \\
        --out runs/ffattn/sweep-attention.json
    python -m attnserve.model.research.feedforward compare --task addition --length 100 \\
        --max-steps 1000 --out runs/ffattn/compare.json   # + docs/zoo-feedforward-{dense,alpha}.png

Every step is a fresh batch of 100 (Adam), on one CPU thread: on one machine, a seed reproduces a run bit for bit.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from attnserve.model.hardware import cpu_info

log = logging.getLogger(__name__)

TASKS = ("addition", "multiplication")
MODELS = ("attention", "gru", "dense")
PLACEMENTS = ("paper", "second_half")
SOLVED_MSE = 0.01  # the paper's criterion
LEAK = 0.01  # Lasagne's leaky_rectify default, which the authors used


# -----------------------------------------------------------------------------
# the tasks


@dataclass
class TaskConfig:
    task: str = "addition"  # "addition" | "multiplication"
    length: int = 100  # T: every sequence is T .. ceil(1.1 T) - 1 steps long
    placement: str = "paper"  # "paper": N2 in [1, L/2 - 1); "second_half": N2 in [ceil(L/2), L - 1)
    shift: int = 0  # move both markers this many steps later (a test-time probe; 0 in training)
    pad_to: int | None = None  # pad the time axis to this width (the dense baseline needs one fixed size)
    # training on many lengths (the paper's variable-length experiment): each batch draws its own
    # T uniformly from [length, length_max]
    length_max: int | None = None

    @property
    def max_length(self) -> int:
        return ceil_11(self.length_max or self.length)


def ceil_11(length: int) -> int:
    """ceil(1.1 T) in integers: in floats 1.1 * 50 is 55.000000000000007, which would admit T=50
    sequences of 55 steps."""
    return -(-11 * length // 10)


@dataclass
class Batch:
    x: torch.Tensor  # (B, W, 2) float32: (value, marker); zeros after each sequence's end
    mask: torch.Tensor  # (B, W) bool: True on the sequence's own steps
    y: torch.Tensor  # (B,) float32 target
    marks: np.ndarray  # (B, 2) int: N1, N2

    def __len__(self) -> int:
        return self.x.size(0)

    def slice(self, start: int, stop: int) -> "Batch":
        return Batch(self.x[start:stop], self.mask[start:stop], self.y[start:stop], self.marks[start:stop])


def make_batch(cfg: TaskConfig, n: int, rng: np.random.Generator) -> Batch:
    """n sequences of the task, a pure function of cfg and the generator's state.

    Every random draw is made whatever `shift`/`placement` say, so the same seed gives the same
    values and lengths under every probe: only the marked positions move."""
    if cfg.length_max is not None:
        if cfg.length_max < cfg.length:
            raise ValueError(f"length_max={cfg.length_max} is below length={cfg.length}")
        T = int(rng.integers(cfg.length, cfg.length_max + 1))
        return make_batch(replace(cfg, length=T, length_max=None, pad_to=cfg.pad_to), n, rng)
    if cfg.task not in TASKS:
        raise ValueError(f"unknown task {cfg.task!r}; expected one of {TASKS}")
    if cfg.placement not in PLACEMENTS:
        raise ValueError(f"unknown placement {cfg.placement!r}; expected one of {PLACEMENTS}")
    if cfg.length < 8:
        raise ValueError("length must be at least 8: the second marker needs room before L/2 - 1")
    max_len = cfg.max_length
    width = cfg.pad_to or max_len
    if width < max_len:
        raise ValueError(f"pad_to={width} is shorter than the longest sequence ({max_len - 1} steps)")
    low, high = (-1.0, 1.0) if cfg.task == "addition" else (0.0, 1.0)
    lengths = rng.integers(cfg.length, max_len, size=n)  # (n,) in [T, 1.1T), as lstm_problems
    values = rng.uniform(low, high, size=(n, max_len))  # (n, max_len)
    u = rng.random(size=n)  # the second marker's draw, mapped onto whichever range applies below
    n1 = rng.integers(1, 10, size=n)  # (n,) one of the first ten steps (never step 0, which is -1)
    if cfg.placement == "paper":
        hi = (lengths / 2 - 1).astype(int)  # int(L/2 - 1), exclusive, as lstm_problems
        count = hi - 1 - (n1 < hi)  # size of [1, hi) without N1
        k = 1 + np.floor(u * count).astype(int)
        n2 = k + ((k >= n1) & (n1 < hi))  # skip over N1
    else:
        lo = np.ceil(lengths / 2).astype(int)
        n2 = lo + np.floor(u * (lengths - 1 - lo)).astype(int)  # [ceil(L/2), L - 1)
    n1, n2 = n1 + cfg.shift, n2 + cfg.shift
    if np.any(np.maximum(n1, n2) >= lengths - 1):
        raise ValueError(f"shift={cfg.shift} moves a marker onto or past the last step at T={cfg.length}")

    steps = np.arange(max_len)[None, :]  # (1, max_len)
    valid = steps < lengths[:, None]  # (n, max_len)
    values = np.where(valid, values, 0.0)
    markers = np.zeros((n, max_len))
    rows = np.arange(n)
    markers[rows, 0] = -1.0
    markers[rows, lengths - 1] = -1.0
    markers[rows, n1] = 1.0
    markers[rows, n2] = 1.0
    a, b = values[rows, n1], values[rows, n2]
    y = 0.5 + (a + b) / 4.0 if cfg.task == "addition" else a * b

    x = np.zeros((n, width, 2), dtype=np.float32)
    x[:, :max_len, 0] = values
    x[:, :max_len, 1] = markers
    mask = np.zeros((n, width), dtype=bool)
    mask[:, :max_len] = valid
    return Batch(torch.from_numpy(x), torch.from_numpy(mask), torch.from_numpy(y.astype(np.float32)),
                 np.stack([n1, n2], axis=1))


def make_test_set(cfg: TaskConfig, n: int, rng: np.random.Generator, chunk: int = 100) -> Batch:
    """A fixed test set; over a range of lengths it is chunks of `chunk` sequences, each chunk with
    its own T, padded to the longest."""
    if cfg.length_max is None:
        return make_batch(cfg, n, rng)
    cfg = replace(cfg, pad_to=cfg.pad_to or cfg.max_length)
    parts = [make_batch(cfg, min(chunk, n - i), rng) for i in range(0, n, chunk)]
    return Batch(torch.cat([b.x for b in parts]), torch.cat([b.mask for b in parts]), torch.cat([b.y for b in parts]),
                 np.concatenate([b.marks for b in parts]))


def task_rng(seed: int, *stream: int) -> np.random.Generator:
    """Independent streams per purpose (training batches, the test set, each probe) from one seed,
    so adding a probe never changes the training data."""
    return np.random.default_rng([seed, *stream])


# -----------------------------------------------------------------------------
# the models


@dataclass
class NetConfig:
    model: str = "attention"  # "attention" | "gru" | "dense"
    d_in: int = 2  # (value, marker)
    hidden: int = 100  # D: every hidden layer of the paper has 100 units
    # width of the tanh layer inside a(h) for score="mlp": the score only has to tell marked steps
    # from the rest, and at 100 it doubles the step time at T=1000 on one CPU thread
    attn_hidden: int = 16
    score: str = "mlp"  # "mlp": v^T tanh(W h + b); "paper": tanh(w^T h + b)
    max_len: int = 110  # dense only: the fixed input width, in steps


def he_init(module: nn.Module) -> None:
    # The authors used He-normal weights and zero biases; torch's default (uniform, a=sqrt(5))
    # starts the leaky-ReLU layers noticeably smaller.
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, a=LEAK, nonlinearity="leaky_relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class Head(nn.Module):
    """The paper's output layers: s = f(W_cs c + b), y = f(W_sy s + b), f = leaky ReLU."""

    def __init__(self, d_in: int, hidden: int):
        super().__init__()
        self.fc = nn.Linear(d_in, hidden)
        self.out = nn.Linear(hidden, 1)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        s = F.leaky_relu(self.fc(c), LEAK)  # (B, D)
        return F.leaky_relu(self.out(s), LEAK).squeeze(-1)  # (B,)


class FeedForwardAttention(nn.Module):
    """Per-step features, a learned softmax weighting over time, their weighted mean, an MLP.
    Nothing depends on the step index, so the weights are the same for any length or position."""

    def __init__(self, cfg: NetConfig):
        super().__init__()
        if cfg.score not in ("mlp", "paper"):
            raise ValueError(f"unknown score {cfg.score!r}")
        self.embed = nn.Linear(cfg.d_in, cfg.hidden)  # W_h, b_h
        if cfg.score == "mlp":
            self.score = nn.Sequential(nn.Linear(cfg.hidden, cfg.attn_hidden), nn.Tanh(),
                                       nn.Linear(cfg.attn_hidden, 1, bias=False))  # v^T tanh(W h + b)
        else:
            self.score = nn.Sequential(nn.Linear(cfg.hidden, 1), nn.Tanh())  # tanh(w^T h + b)
        self.head = Head(cfg.hidden, cfg.hidden)
        he_init(self)
        # a(h) is linear in its last weights: N(0, 1/D) as the authors' scripts, so e starts small
        # and alpha starts near uniform
        last = self.score[-1] if cfg.score == "mlp" else self.score[0]
        nn.init.normal_(last.weight, std=1.0 / math.sqrt(last.in_features))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x (B, T, 2), mask (B, T) -> y (B,), alpha (B, T)
        h = F.leaky_relu(self.embed(x), LEAK)  # (B, T, D)
        e = self.score(h).squeeze(-1)  # (B, T)
        # -inf, not a large negative number: exp(-inf) is exactly 0, so padding has no weight at
        # all and a sequence's output does not depend on how much padding its batch carries
        e = e.masked_fill(~mask, float("-inf"))
        alpha = torch.softmax(e, dim=1)  # (B, T)
        c = torch.einsum("bt,btd->bd", alpha, h)  # (B, D)
        return self.head(c), alpha


class GRUBaseline(nn.Module):
    """A GRU over the sequence; its state after the last real step feeds the same head."""

    def __init__(self, cfg: NetConfig):
        super().__init__()
        self.rnn = nn.GRU(cfg.d_in, cfg.hidden, batch_first=True)
        self.head = Head(cfg.hidden, cfg.hidden)
        he_init(self.head)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, None]:
        out, _ = self.rnn(x)  # (B, T, D); padding comes after the real steps, so it cannot leak in
        last = (mask.sum(1) - 1).view(-1, 1, 1).expand(-1, 1, out.size(-1))  # (B, 1, D)
        return self.head(out.gather(1, last).squeeze(1)), None


class DenseBaseline(nn.Module):
    """"Just a dense layer with tanh": one weight per (step, feature), tanh, then the same head.
    Inputs are zero-padded to max_len steps; steps past what training covered keep their init."""

    def __init__(self, cfg: NetConfig):
        super().__init__()
        self.max_len = cfg.max_len
        self.proj = nn.Linear(cfg.max_len * cfg.d_in, cfg.hidden)
        self.head = Head(cfg.hidden, cfg.hidden)
        he_init(self.head)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, None]:
        B, T, C = x.shape
        if T > self.max_len:
            raise ValueError(f"the dense baseline takes at most {self.max_len} steps, got {T}")
        x = F.pad(x, (0, 0, 0, self.max_len - T))  # (B, max_len, 2)
        h = torch.tanh(self.proj(x.flatten(1)))  # (B, D)
        return self.head(h), None


def build_model(cfg: NetConfig) -> nn.Module:
    if cfg.model == "attention":
        return FeedForwardAttention(cfg)
    if cfg.model == "gru":
        return GRUBaseline(cfg)
    if cfg.model == "dense":
        return DenseBaseline(cfg)
    raise ValueError(f"unknown model {cfg.model!r}; expected one of {MODELS}")


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -----------------------------------------------------------------------------
# training


@dataclass
class TrainConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    net: NetConfig = field(default_factory=NetConfig)
    max_steps: int = 2000
    batch_size: int = 100  # the authors' scripts
    lr: float = 1e-3  # Adam; the authors searched {1e-2, 3e-3, 1e-3, 3e-4}
    eval_every: int = 50
    test_size: int = 1000  # the authors' scripts: 10 batches of 100
    seed: int = 0
    stop_when_solved: bool = True
    threads: int = 1


@torch.no_grad()
def evaluate(model: nn.Module, data: Batch, chunk: int = 100) -> dict[str, float]:
    """Test MSE, and the fraction within 0.04 of the target (Hochreiter & Schmidhuber's
    per-sequence criterion, which the authors' scripts also log)."""
    was_training = model.training
    model.eval()
    preds = [model(part.x, part.mask)[0] for part in (data.slice(i, i + chunk) for i in range(0, len(data), chunk))]
    model.train(was_training)
    err = torch.cat(preds) - data.y  # (N,)
    return {"mse": float((err**2).mean()), "acc04": float((err.abs() < 0.04).float().mean())}


def fit(cfg: TrainConfig, model: nn.Module | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Adam on MSE with a fresh batch every step (the task is infinite, as in the paper); test MSE
    every eval_every steps on a fixed held-out set; solved at the first evaluation under 0.01."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    if model is None:
        model = build_model(cfg.net)
    train_rng, test_rng = task_rng(cfg.seed, 0), task_rng(cfg.seed, 1)
    test = make_test_set(cfg.task, cfg.test_size, test_rng)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    history: list[dict[str, float]] = []
    solved_at: int | None = None
    running, seen = 0.0, 0
    start = time.perf_counter()
    step = 0
    for step in range(1, cfg.max_steps + 1):
        batch = make_batch(cfg.task, cfg.batch_size, train_rng)
        pred, _ = model(batch.x, batch.mask)
        loss = F.mse_loss(pred, batch.y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running, seen = running + loss.item(), seen + 1
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            metrics = evaluate(model, test)
            history.append({"step": step, "train_mse": running / seen, "test_mse": metrics["mse"],
                            "test_acc04": metrics["acc04"]})
            running, seen = 0.0, 0
            log.info("%s T=%d %s step %d: train %.5f test %.5f acc04 %.3f", cfg.task.task, cfg.task.length,
                     cfg.net.model, step, history[-1]["train_mse"], metrics["mse"], metrics["acc04"])
            if solved_at is None and metrics["mse"] < SOLVED_MSE:
                solved_at = step
                if cfg.stop_when_solved:
                    break
            if not math.isfinite(metrics["mse"]):
                log.warning("non-finite test MSE; stopping")
                break
    wall = time.perf_counter() - start
    last = history[-1]
    result = {
        "task": cfg.task.task, "length": cfg.task.length, "length_max": cfg.task.length_max,
        "model": cfg.net.model, "seed": cfg.seed,
        "params": n_params(model), "lr": cfg.lr, "batch_size": cfg.batch_size, "max_steps": cfg.max_steps,
        "steps_run": step, "solved": solved_at is not None, "steps_to_solve": solved_at,
        "status": f"solved at step {solved_at}" if solved_at else f"not solved within {cfg.max_steps} steps",
        "final_test_mse": last["test_mse"], "final_test_acc04": last["test_acc04"],
        "best_test_mse": min(h["test_mse"] for h in history), "history": history, "wall_s": round(wall, 2),
    }
    log.info("%s T=%d %s: %s (%.1f s)", cfg.task.task, cfg.task.length, cfg.net.model, result["status"], wall)
    return model, result


def hardware() -> dict[str, Any]:
    return {"cpu": cpu_info()["model"], "torch": torch.__version__, "threads": torch.get_num_threads()}


def train_config(task: str, length: int, model: str, max_steps: int, seed: int, lr: float, eval_every: int,
                 test_size: int, max_len: int | None = None, stop_when_solved: bool = True,
                 length_max: int | None = None) -> TrainConfig:
    max_len = max_len or ceil_11(length_max or length)
    # the dense model needs one fixed width; the others get exactly the sequences' own padding
    pad_to = max_len if model == "dense" else None
    return TrainConfig(task=TaskConfig(task=task, length=length, pad_to=pad_to, length_max=length_max),
                       net=NetConfig(model=model, max_len=max_len), max_steps=max_steps, seed=seed, lr=lr,
                       eval_every=eval_every, test_size=test_size, stop_when_solved=stop_when_solved)


def write_json(path: str | Path, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


# -----------------------------------------------------------------------------
# the comparison: is it just a dense layer?


def probes(length: int, test_lengths: list[int], shifts: list[int]) -> list[dict[str, Any]]:
    """Test conditions for a model trained at `length`: other lengths (markers as in training),
    both markers moved later, and the second marker in the second half."""
    out = [{"kind": "length", "length": L, "placement": "paper", "shift": 0} for L in test_lengths]
    out += [{"kind": "shift", "length": length, "placement": "paper", "shift": s} for s in shifts]
    out.append({"kind": "second_half", "length": length, "placement": "second_half", "shift": 0})
    return out


def compare(task: str = "addition", length: int = 100, max_steps: int = 1000, seed: int = 0, lr: float = 1e-3,
            eval_every: int = 50, test_size: int = 1000, test_lengths: list[int] | None = None,
            shifts: list[int] | None = None, models: list[str] | None = None,
            train_lengths: tuple[int, int] | None = None) -> tuple[dict[str, Any], dict[str, nn.Module]]:
    """Train every model at `length` (or on T drawn per batch from train_lengths) for exactly
    max_steps (the same budget, no early stop), then test each on the probes; the marker probes
    are at `length`. The dense model is as wide as the longest sequence it will see."""
    test_lengths = test_lengths or [length // 2, length, 2 * length, 5 * length]
    shifts = shifts if shifts is not None else [0, length // 5, 2 * length // 5]
    models = models or ["dense", "attention", "gru"]
    conditions = probes(length, test_lengths, shifts)
    low, high = train_lengths or (length, None)
    max_len = ceil_11(max(test_lengths + [length, high or low]))
    out: dict[str, Any] = {"task": task, "train_length": length, "train_lengths": [low, high or low],
                           "max_steps": max_steps, "seed": seed, "lr": lr,
                           "test_size": test_size, "dense_max_len": max_len, "hardware": hardware(),
                           "conditions": conditions, "models": {}}
    trained: dict[str, nn.Module] = {}
    for name in models:
        cfg = train_config(task, low, name, max_steps, seed, lr, eval_every, test_size, max_len=max_len,
                           stop_when_solved=False, length_max=high)
        model, result = fit(cfg)
        trained[name] = model
        tests = []
        for i, cond in enumerate(conditions):
            probe = TaskConfig(task=task, length=cond["length"], placement=cond["placement"], shift=cond["shift"],
                               pad_to=max_len if name == "dense" else None)
            # the same stream for every model: all three see the very same test sequences
            metrics = evaluate(model, make_batch(probe, test_size, task_rng(seed, 2, i)))
            tests.append({**cond, "test_mse": metrics["mse"], "test_acc04": metrics["acc04"],
                          "solved": metrics["mse"] < SOLVED_MSE})
            log.info("%s probe %s: test MSE %.5f", name, cond, metrics["mse"])
        out["models"][name] = {"train": result, "probes": tests}
    return out, trained


def plot_dense(result: dict[str, Any], path: str | Path) -> None:
    """Test MSE against test length, and against where the markers are, per model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    styles = {"dense": ("tab:red", "s"), "attention": ("tab:blue", "o"), "gru": ("tab:green", "^")}
    for name, res in result["models"].items():
        color, marker = styles.get(name, ("k", "x"))
        lengths = [p for p in res["probes"] if p["kind"] == "length"]
        left.plot([p["length"] for p in lengths], [p["test_mse"] for p in lengths], marker=marker, color=color,
                  label=f"{name} ({res['train']['params']:,} params)")
        moved = [p for p in res["probes"] if p["kind"] != "length"]
        labels = [f"+{p['shift']}" if p["kind"] == "shift" else "2nd half" for p in moved]
        right.plot(labels, [p["test_mse"] for p in moved], marker=marker, color=color)
    T = result["train_length"]
    low, high = result.get("train_lengths", [T, T])
    trained = f"T={low}" if low == high else f"T in [{low}, {high}]"
    for ax in (left, right):
        ax.axhline(SOLVED_MSE, color="gray", ls="--", lw=1)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    if low == high:
        left.axvline(T, color="gray", ls=":", lw=1)
    else:
        left.axvspan(low, high, color="gray", alpha=0.12, lw=0)
    left.set_xscale("log")
    ticks = [p["length"] for p in next(iter(result["models"].values()))["probes"] if p["kind"] == "length"]
    left.set_xticks(ticks, [str(t) for t in ticks])
    left.minorticks_off()
    left.set_xlabel(f"test length T (trained at {trained})")
    left.set_ylabel("test MSE (dashed: solved)")
    left.legend(fontsize=8)
    right.set_xlabel(f"markers at T={T}: both shifted later / 2nd marker in 2nd half")
    fig.suptitle(f"{result['task']}: trained {result['max_steps']} steps at {trained}, tested elsewhere", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


@torch.no_grad()
def plot_alpha(model: nn.Module, task: str, length: int, seed: int, path: str | Path, shift: int) -> None:
    """alpha over steps for a few test sequences (in training's setting and moved), marks drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("as in training", TaskConfig(task=task, length=length)),
              (f"both markers +{shift}", TaskConfig(task=task, length=length, shift=shift)),
              ("2nd marker in 2nd half", TaskConfig(task=task, length=length, placement="second_half")),
              (f"T={5 * length}", TaskConfig(task=task, length=5 * length))]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 1.7 * len(panels)))
    model.eval()
    for ax, (title, cfg) in zip(axes, panels):
        data = make_batch(cfg, 3, task_rng(seed, 3))
        pred, alpha = model(data.x, data.mask)
        for i in range(len(data)):
            n = int(data.mask[i].sum())
            line, = ax.plot(np.arange(n), alpha[i, :n].numpy(), lw=1)
            for m in data.marks[i]:
                ax.axvline(m, color=line.get_color(), ls="--", lw=0.8, alpha=0.7)
        err = (pred - data.y).abs().max().item()
        ax.set_title(f"{title}  (max |error| of these 3: {err:.3f})", fontsize=9)
        ax.set_ylabel("alpha", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[-1].set_xlabel("step t (dashed: the two marked steps)", fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


# -----------------------------------------------------------------------------
# command line


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)  # single thread: numbers are reproducible and the CPUs are shared
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--max-steps", type=int, default=1000)
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--lr", type=float, default=1e-3)
    common.add_argument("--eval-every", type=int, default=50)
    common.add_argument("--test-size", type=int, default=1000)
    common.add_argument("--out", required=True)

    if argv and argv[0] == "compare":
        p = argparse.ArgumentParser(prog="feedforward compare", parents=[common])
        p.add_argument("--task", choices=TASKS, default="addition")
        p.add_argument("--length", type=int, default=100)
        p.add_argument("--test-lengths", type=int, nargs="+")
        p.add_argument("--shifts", type=int, nargs="+")
        p.add_argument("--models", nargs="+", choices=MODELS)
        p.add_argument("--train-lengths", type=int, nargs=2, metavar=("LOW", "HIGH"),
                       help="train on T drawn per batch from [LOW, HIGH] instead of at --length")
        p.add_argument("--plot-dense", default="docs/zoo-feedforward-dense.png")
        p.add_argument("--plot-alpha", default="docs/zoo-feedforward-alpha.png")
        a = p.parse_args(argv[1:])
        result, trained = compare(a.task, a.length, a.max_steps, a.seed, a.lr, a.eval_every, a.test_size,
                                  a.test_lengths, a.shifts, a.models, a.train_lengths)
        result["command"] = "python -m attnserve.model.research.feedforward " + " ".join(argv)
        write_json(a.out, result)
        if a.plot_dense:
            plot_dense(result, a.plot_dense)
        if a.plot_alpha and "attention" in trained:
            shifts = [c["shift"] for c in result["conditions"] if c["kind"] == "shift"]
            plot_alpha(trained["attention"], a.task, a.length, a.seed, a.plot_alpha, shift=max(shifts, default=0))
        return
    if argv and argv[0] == "sweep":
        p = argparse.ArgumentParser(prog="feedforward sweep", parents=[common])
        p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
        p.add_argument("--lengths", type=int, nargs="+", default=[50, 100, 500, 1000])
        p.add_argument("--models", nargs="+", choices=MODELS, default=["attention", "gru"])
        a = p.parse_args(argv[1:])
        out: dict[str, Any] = {"command": "python -m attnserve.model.research.feedforward " + " ".join(argv),
                               "hardware": hardware(), "runs": []}
        for task in a.tasks:
            for length in a.lengths:
                for model in a.models:
                    cfg = train_config(task, length, model, a.max_steps, a.seed, a.lr, a.eval_every, a.test_size)
                    out["runs"].append(fit(cfg)[1])
                    write_json(a.out, out)  # after every run: a long sweep keeps what it finished
        return

    p = argparse.ArgumentParser(prog="python -m attnserve.model.research.feedforward", parents=[common],
                                description="Train one model on one task; subcommands: compare, sweep.")
    p.add_argument("--task", choices=TASKS, default="addition")
    p.add_argument("--length", type=int, default=100)
    p.add_argument("--model", choices=MODELS, default="attention")
    p.add_argument("--length-max", type=int, help="train and test on T drawn per batch from [--length, this]")
    a = p.parse_args(argv)
    cfg = train_config(a.task, a.length, a.model, a.max_steps, a.seed, a.lr, a.eval_every, a.test_size,
                       length_max=a.length_max)
    _, result = fit(cfg)
    result.update(command="python -m attnserve.model.research.feedforward " + " ".join(argv), hardware=hardware(),
                  config=asdict(cfg))
    write_json(a.out, result)


if __name__ == "__main__":
    main()
