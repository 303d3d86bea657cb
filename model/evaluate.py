"""Translate with the torch reference decoder and score with sacrebleu.

`attnserve eval` writes, per run, the test BLEU/chrF and BLEU by source-length bucket (the
comparison of Bahdanau et al. 2014, Figure 2) as JSON, and one PNG plotting every run given.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import sacrebleu
import torch

from attnserve.decoding_rules import max_source_tokens, source_ids
from attnserve.model.base import EncoderDecoder
from attnserve.model.batching import pad, token_batches
from attnserve.model.checkpoint import load_model
from attnserve.model.corpus import load_tsv
from attnserve.model.decode import DecodeOptions, Hypothesis, decode
from attnserve.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# Source length in words (whitespace tokens), as in Bahdanau et al.'s Figure 2.
LENGTH_BUCKETS = [(1, 5), (6, 10), (11, 20), (21, 30), (31, 1000)]


def translate_texts(
    model: EncoderDecoder,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    opts: DecodeOptions | None = None,
    max_tokens: int = 4000,
) -> list[list[Hypothesis]]:
    """Translate texts in length-sorted token batches; results come back in input order."""
    opts = opts or DecodeOptions()
    device = next(model.parameters()).device
    max_src = max_source_tokens(model.config.max_len)
    ids = [source_ids(s, model.config.max_len) for s in tokenizer.encode(list(texts))]
    results: list[list[Hypothesis]] = [[] for _ in texts]
    # Beam search multiplies the batch by the beam size.
    for batch in token_batches([len(s) for s in ids], max(max_tokens // opts.beam_size, max_src + 1)):
        src = pad([ids[i] for i in batch]).to(device)
        for i, hyps in zip(batch, decode(model, src, opts)):
            results[i] = hyps
    return results


def translate_best(model, tokenizer, texts, opts=None, max_tokens=4000) -> list[str]:
    hyps = translate_texts(model, tokenizer, texts, opts, max_tokens)
    return tokenizer.decode([h[0].tokens for h in hyps])


def bucket_of(source: str) -> str:
    words = len(source.split())
    for low, high in LENGTH_BUCKETS:
        if low <= words <= high:
            return f"{low}-{high}" if high < 1000 else f"{low}+"
    return f"{LENGTH_BUCKETS[-1][0]}+"


def score(sources: Sequence[str], hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """Corpus BLEU/chrF overall and BLEU per source-length bucket."""
    result = {
        "bleu": round(sacrebleu.corpus_bleu(hypotheses, [references]).score, 2),
        "chrf": round(sacrebleu.corpus_chrf(hypotheses, [references]).score, 2),
        "sentences": len(sources),
        "buckets": {},
    }
    groups: dict[str, list[int]] = {}
    for i, source in enumerate(sources):
        groups.setdefault(bucket_of(source), []).append(i)
    for low, high in LENGTH_BUCKETS:
        name = f"{low}-{high}" if high < 1000 else f"{low}+"
        members = groups.get(name, [])
        if members:
            bleu = sacrebleu.corpus_bleu([hypotheses[i] for i in members], [[references[i] for i in members]])
            result["buckets"][name] = {"bleu": round(bleu.score, 2), "sentences": len(members)}
    return result


def evaluate_run(run_dir: Path, split_path: Path, opts: DecodeOptions, which: str = "best", device: str = "cpu") -> dict:
    """Decode a split with a run's checkpoint; writes eval-<split>.json and hypotheses beside it."""
    model, tokenizer, config = load_model(run_dir, which, device)
    rows = load_tsv(split_path)
    sources, references = [s for s, _ in rows], [t for _, t in rows]
    start = time.perf_counter()
    hypotheses = translate_best(model, tokenizer, sources, opts)
    seconds = time.perf_counter() - start
    meta = json.loads((Path(run_dir) / "checkpoints" / which / "meta.json").read_text())
    result = {
        "run": str(run_dir),
        "model": config.model.label,
        "parameters": model.num_parameters(),
        "checkpoint": which,
        "step": meta.get("step"),
        "train_seconds": meta.get("train_seconds"),
        "split": str(split_path),
        "beam_size": opts.beam_size,
        "decode_seconds": round(seconds, 1),
        **score(sources, hypotheses, references),
    }
    stem = f"eval-{split_path.stem}-beam{opts.beam_size}"
    (Path(run_dir) / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (Path(run_dir) / f"{stem}.hyp.txt").write_text("".join(h + "\n" for h in hypotheses))
    log.info("%s: BLEU %.2f chrF %.2f on %s", run_dir, result["bleu"], result["chrf"], split_path)
    return result


def plot_buckets(results: Sequence[dict], path: Path) -> None:
    """BLEU against source length, one line per model (Bahdanau et al. 2014, Figure 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for result in results:
        names = list(result["buckets"])
        ax.plot(names, [result["buckets"][n]["bleu"] for n in names], marker="o",
                label=f"{result['model']} ({result['bleu']:.1f})")
    ax.set_xlabel("source sentence length (words)")
    ax.set_ylabel("BLEU")
    ax.set_title("Test BLEU by source length")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
