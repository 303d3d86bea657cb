"""How softmax, sparsemax and CRF attention weights differ in trained translators: the sparsity
of the weights (exact zeros), how many source positions carry weight, their entropy and peak,
and a figure of one sentence's alignment per run.

    python -m attnserve.model.research.normaliser_report runs/rnn-bahdanau runs/rnn-bahdanau-sparsemax \\
        runs/rnn-bahdanau-crf --sentences 200 --out runs/normalisers.json --figure docs/zoo-normalisers.png

The weights are the teacher-forced attention of each target position over the source (the
reference translation as the decoder's input), on the first test sentences of each run's data.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch

from attnserve.model.batching import collate, encode_pairs
from attnserve.model.checkpoint import load_model, read_config
from attnserve.model.corpus import load_tsv

log = logging.getLogger("attnserve.model.research.normaliser_report")


@torch.inference_mode()
def attention_of(run: Path, rows: list[tuple[str, str]], batch: int = 32) -> tuple[list[np.ndarray], object, object]:
    """Per sentence, its (target + EOS, source + EOS) attention, teacher-forced."""
    model, tokenizer, config = load_model(run, "best", "cpu")
    model.eval()
    examples = encode_pairs(tokenizer, rows, config.model.max_len)
    maps = []
    for start in range(0, len(examples), batch):
        chunk = examples[start : start + batch]
        src, tgt_in, _ = collate(chunk)
        _, attention = model(src, tgt_in, return_attention=True)  # (B, T, S)
        for (s, t), a in zip(chunk, attention):
            maps.append(a[: len(t) + 1, : len(s)].float().numpy())
    return maps, tokenizer, config


def statistics(maps: list[np.ndarray]) -> dict:
    weights = np.concatenate([m.ravel() for m in maps])
    rows = [row for m in maps for row in m]
    entropy = [float(-(r[r > 0] * np.log(r[r > 0])).sum()) for r in rows]
    return {
        "rows": len(rows),
        "exact_zero_share": round(float((weights == 0).mean()), 4),
        "mean_support": round(float(np.mean([(r > 0).sum() for r in rows])), 2),
        "mean_source_length": round(float(np.mean([len(r) for r in rows])), 2),
        "mean_max_weight": round(float(np.mean([r.max() for r in rows])), 3),
        "mean_entropy_nats": round(float(np.mean(entropy)), 3),
        "sum_error_max": float(max(abs(r.sum() - 1) for r in rows)),
    }


def figure(runs: list[Path], maps: list[np.ndarray], tokenizers: list, rows: list[tuple[str, str]], index: int,
           path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    src, tgt = rows[index]
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 4.2), squeeze=False)
    for ax, run, m, tokenizer in zip(axes[0], runs, maps, tokenizers):
        src_pieces = tokenizer.sp.encode(src, out_type=str) + ["</s>"]
        tgt_pieces = tokenizer.sp.encode(tgt, out_type=str) + ["</s>"]
        ax.imshow(m, cmap="Greys", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(src_pieces)), src_pieces, rotation=90, fontsize=7)
        ax.set_yticks(range(len(tgt_pieces)), tgt_pieces, fontsize=7)
        zeros = 100 * float((m == 0).mean())
        ax.set_title(f"{run.name}\n{zeros:.0f}% exact zeros", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--sentences", type=int, default=200, help="first test sentences of the run's data")
    parser.add_argument("--example", type=int, default=3, help="the test sentence drawn in the figure")
    parser.add_argument("--out", type=Path, help="JSON of the statistics")
    parser.add_argument("--figure", type=Path, help="PNG: one alignment per run")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    results, all_maps, tokenizers, rows = {}, [], [], []
    for run in args.runs:
        rows = load_tsv(Path(read_config(run).train.data_dir) / "test.tsv")[: args.sentences]
        maps, tokenizer, config = attention_of(run, rows)
        results[run.name] = {"normaliser": config.model.normaliser, **statistics(maps)}
        all_maps.append(maps[args.example])
        tokenizers.append(tokenizer)
        log.info("%s: %s", run.name, results[run.name])
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    if args.figure:
        figure(args.runs, all_maps, tokenizers, rows, args.example, args.figure)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
