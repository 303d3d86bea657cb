"""CTranslate2 backend for a trained Transformer run, to benchmark against our own engines.

The CTranslate2 model is built with its `TransformerSpec` API straight from our state dict,
not through the OpenNMT-py or fairseq converters: our checkpoints are neither, and filling the
spec ourselves is how we know that CTranslate2 decodes with exactly our weights. The choices
parity depends on, each checked against the CTranslate2 4.8 sources:

    positions       CT2's built-in sinusoids are [sin | cos] concatenated, with timescales
                    log(10000) / (d/2 - 1) and positions counted from 1; ours are Vaswani's
                    interleaved sin/cos from position 0. So our `pe` buffer is stored as the
                    explicit position encodings of both stacks.
    embeddings      one matrix for encoder input, decoder input and the output projection (no
                    bias); CT2 scales inputs by sqrt(d_model) as we do (`scale_embeddings`).
    activation      Activation.GELU is the exact erf GELU of torch's F.gelu, not GELUTanh.
    layer norm      pre-norm, with a final norm on both stacks; epsilon copied from the model.
    special tokens  decoding starts from "<s>" and stops at "</s>"; CT2 adds nothing to the
                    source (add_source_bos/eos off): `translate` appends EOS itself, exactly as
                    model/evaluate.py does.
    min length      CT2 forbids EOS at the first step unless min_decoding_length=0; ours allows it.
    length limit    CT2 takes one max_decoding_length per call, ours is per sentence
                    (int(a * source length + b), capped at max_len - 1). Greedy: one call with
                    the largest limit, and a step callback stops each sentence at its own.
                    Beam search takes no callback, so each group of sentences sharing a limit
                    is decoded in its own call: exact, at the cost of smaller batches.
    length penalty  CT2 divides by length ** alpha; ours by the GNMT ((5 + length) / 6) ** alpha,
                    when ranking final hypotheses only. So CT2 is asked for raw log-probabilities
                    (length_penalty=0) and `translate` applies ours.

Beam search stays different by construction: CT2 replaces a finished hypothesis by the next
live candidate and, without a length penalty, stops once its best candidate has finished;
ours keeps finished hypotheses in the beam and stops when all of them have finished. Greedy
decoding has no such freedom and is token-for-token identical in float32.

    python -m bench.ct2 runs/transformer --sentences 200    # parity report
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from collections import defaultdict
from pathlib import Path

import ctranslate2
import numpy as np
import torch
from ctranslate2.specs import attention_spec, common_spec, transformer_spec

from attnserve.decoding_rules import LengthLimit, length_normalised, max_target_length, source_ids
from attnserve.model.checkpoint import load_model
from attnserve.model.corpus import load_tsv
from attnserve.model.decode import DecodeOptions, Hypothesis
from attnserve.model.evaluate import translate_texts
from attnserve.model.tokenizer import BOS_ID, EOS_ID, UNK_ID, Tokenizer
from attnserve.model.transformer import Transformer

log = logging.getLogger(__name__)


class _Weights:
    """Our state dict as float32 numpy arrays. Every name taken is recorded: a weight that no
    spec variable took means the spec does not describe our model, and conversion fails."""

    def __init__(self, model: Transformer):
        self.arrays = {name: t.detach().cpu().float().numpy() for name, t in model.state_dict().items()}
        self.used: set[str] = set()

    def __call__(self, name: str) -> np.ndarray:
        self.used.add(name)
        return self.arrays[name]

    def check_all_used(self) -> None:
        unused = sorted(set(self.arrays) - self.used)
        if unused:
            raise ValueError(f"weights with no place in the CTranslate2 spec: {unused}")


def _set_linear(spec: common_spec.LinearSpec, weights: _Weights, *modules: str) -> None:
    """One CT2 linear from one or more nn.Linear, stacked along the output dimension: CT2 keeps
    self-attention q/k/v as one matrix, and cross-attention k/v as another."""
    spec.weight = np.concatenate([weights(f"{m}.weight") for m in modules])
    spec.bias = np.concatenate([weights(f"{m}.bias") for m in modules])


def _set_layer_norm(spec: common_spec.LayerNormSpec, weights: _Weights, module: str) -> None:
    spec.gamma = weights(f"{module}.weight")
    spec.beta = weights(f"{module}.bias")


def _set_ffn(spec: transformer_spec.FeedForwardSpec, weights: _Weights, layer: str, norm: str) -> None:
    _set_layer_norm(spec.layer_norm, weights, f"{layer}.{norm}")
    _set_linear(spec.linear_0, weights, f"{layer}.ff.fc1")
    _set_linear(spec.linear_1, weights, f"{layer}.ff.fc2")


def _set_self_attention(spec: attention_spec.MultiHeadAttentionSpec, weights: _Weights, layer: str) -> None:
    attn = f"{layer}.self_attn"
    _set_layer_norm(spec.layer_norm, weights, f"{layer}.ln1")
    _set_linear(spec.linear[0], weights, f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj")
    _set_linear(spec.linear[1], weights, f"{attn}.out_proj")


def _set_cross_attention(spec: attention_spec.MultiHeadAttentionSpec, weights: _Weights, layer: str) -> None:
    attn = f"{layer}.cross_attn"
    _set_layer_norm(spec.layer_norm, weights, f"{layer}.ln2")
    _set_linear(spec.linear[0], weights, f"{attn}.q_proj")
    _set_linear(spec.linear[1], weights, f"{attn}.k_proj", f"{attn}.v_proj")
    _set_linear(spec.linear[2], weights, f"{attn}.out_proj")


def build_spec(model: Transformer, vocab: list[str]) -> transformer_spec.TransformerSpec:
    """A validated TransformerSpec holding `model`'s weights, with `vocab` (piece i = id i) as
    both source and target vocabulary."""
    cfg = model.config
    if len(vocab) != cfg.vocab_size:
        raise ValueError(f"vocabulary has {len(vocab)} pieces, the model {cfg.vocab_size} embeddings")
    if len(set(vocab)) != len(vocab):
        raise ValueError("vocabulary pieces are not unique, but CTranslate2 maps tokens to ids by string")
    spec = transformer_spec.TransformerSpec.from_config(
        (cfg.enc_layers, cfg.dec_layers),
        cfg.n_heads,
        pre_norm=True,
        no_final_norm=False,
        activation=common_spec.Activation.GELU,
    )
    spec.config.unk_token = vocab[UNK_ID]
    spec.config.bos_token = vocab[BOS_ID]
    spec.config.eos_token = vocab[EOS_ID]
    spec.config.decoder_start_token = vocab[BOS_ID]
    spec.config.add_source_bos = False
    spec.config.add_source_eos = False
    spec.config.layer_norm_epsilon = model.encoder_norm.eps

    weights = _Weights(model)
    embedding = weights("embedding.weight")
    positions = model.positions.pe.detach().cpu().float().numpy()  # a buffer, not in the state dict

    spec.encoder.embeddings[0].weight = embedding
    spec.encoder.position_encodings.encodings = positions
    _set_layer_norm(spec.encoder.layer_norm, weights, "encoder_norm")
    for i, layer in enumerate(spec.encoder.layer):
        _set_self_attention(layer.self_attention, weights, f"encoder_layers.{i}")
        _set_ffn(layer.ffn, weights, f"encoder_layers.{i}", "ln2")

    spec.decoder.embeddings.weight = embedding
    spec.decoder.position_encodings.encodings = positions
    spec.decoder.projection.weight = embedding  # tied output projection, without bias
    _set_layer_norm(spec.decoder.layer_norm, weights, "decoder_norm")
    for i, layer in enumerate(spec.decoder.layer):
        _set_self_attention(layer.self_attention, weights, f"decoder_layers.{i}")
        _set_cross_attention(layer.attention, weights, f"decoder_layers.{i}")
        _set_ffn(layer.ffn, weights, f"decoder_layers.{i}", "ln3")
    weights.check_all_used()

    spec.register_source_vocabulary(vocab)
    spec.register_target_vocabulary(vocab)
    spec.validate()
    return spec


def pieces(tokenizer: Tokenizer) -> list[str]:
    """The SentencePiece pieces in id order: the token strings CTranslate2 works with."""
    return [tokenizer.sp.id_to_piece(i) for i in range(tokenizer.vocab_size)]


def save_model(model: Transformer, vocab: list[str], out_dir: Path, quantization: str | None = None) -> Path:
    """Write `model` as a CTranslate2 model directory, replacing the files of one already there.

    quantization is CT2's weight type (int8, int8_float32, float16, ...); None keeps float32.
    The three uses of the shared embedding are stored once: CT2 aliases equal variables."""
    spec = build_spec(model, vocab)
    spec.optimize(quantization=quantization)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec.save(str(out_dir))
    log.info("CTranslate2 model (%s weights) written to %s", quantization or "float32", out_dir)
    return out_dir


def convert(run_dir: Path, out_dir: Path, quantization: str | None = None) -> Path:
    """Build a ctranslate2 TransformerSpec with our weights and save it to out_dir (model.bin +
    vocabularies). Converts the run's best checkpoint."""
    model, tokenizer, config = load_model(run_dir, "best")
    if not isinstance(model, Transformer):
        raise ValueError(f"{run_dir} is a {config.model.arch} run; CTranslate2 conversion needs a transformer")
    return save_model(model, pieces(tokenizer), out_dir, quantization)


def read_vocabulary(model_dir: Path) -> list[str]:
    """The token strings of a converted model, in id order (the `vocab` of `translate`)."""
    return json.loads((Path(model_dir) / "shared_vocabulary.json").read_text(encoding="utf-8"))


def load_translator(
    model_dir: Path, device: str = "cpu", compute_type: str = "float32", intra_threads: int = 0,
    inter_threads: int = 1,
) -> ctranslate2.Translator:
    """A Translator with inter_threads workers (batches decoded in parallel, when that many
    calls are in flight) of intra_threads threads each (0: CT2 picks).

    compute_type "float32" runs int8-quantized weights in float32: load those with "int8"."""
    return ctranslate2.Translator(
        str(model_dir), device=device, compute_type=compute_type, inter_threads=inter_threads,
        intra_threads=intra_threads,
    )


def _sources_and_limits(sources: list[list[int]], max_len: int, max_len_a: float,
                        max_len_b: int) -> tuple[list[list[int]], list[int]]:
    """The sources as our model reads them (cut, EOS appended) and each one's target length
    limit, by the rules the reference and the engine apply (attnserve/decoding_rules.py)."""
    ids = [source_ids(s, max_len) for s in sources]
    limit = LengthLimit(max_len_a, max_len_b)
    return ids, [max_target_length(len(s), max_len, limit) for s in ids]


def translate(
    translator: ctranslate2.Translator,
    sources: list[list[int]],
    vocab: list[str],
    beam_size: int = 1,
    length_penalty: float = DecodeOptions.length_penalty,
    max_batch_size: int = 32,
    *,
    max_len: int,
    max_len_a: float = DecodeOptions.max_len_a,
    max_len_b: int = DecodeOptions.max_len_b,
) -> list[Hypothesis]:
    """The best hypothesis for each source (spm ids without EOS), in input order.

    As in model/evaluate.py and model/decode.py: sources are cut to max_len - 1 tokens and get
    EOS appended; each sentence may produce int(a * (that length) + b), capped at max_len - 1,
    target tokens counting EOS; the beam's hypotheses are ranked by log-probability / ((5 +
    length) / 6) ** length_penalty, length counting EOS, which is also the score returned.
    max_len is the model's (config.model.max_len): CT2 does not know it.
    """
    ids, limits = _sources_and_limits(sources, max_len, max_len_a, max_len_b)
    groups: dict[int, list[int]] = defaultdict(list)
    if beam_size == 1:
        groups[max(limits, default=0)] = list(range(len(ids)))
    else:
        for i, limit in enumerate(limits):
            groups[limit].append(i)

    def stop_at_limit(step: ctranslate2.GenerationStepResult) -> bool:
        """Greedy search calls this after each token with the sentence's index in the call (here
        its index in `sources`); True ends that sentence."""
        return step.step + 1 >= limits[step.batch_id]

    index = {piece: i for i, piece in enumerate(vocab)}
    results: dict[int, Hypothesis] = {}
    for limit, members in groups.items():
        outputs = translator.translate_batch(
            [[vocab[t] for t in ids[i]] for i in members],
            max_batch_size=max_batch_size,
            beam_size=beam_size,
            num_hypotheses=beam_size,  # all finished hypotheses, for our length penalty to rank
            length_penalty=0.0,  # raw log-probabilities
            max_input_length=0,  # sources are already cut, as our model sees them
            max_decoding_length=limit,
            min_decoding_length=0,
            end_token=vocab[EOS_ID],
            return_scores=True,
            sampling_topk=1,  # argmax: no sampling
            callback=stop_at_limit if beam_size == 1 else None,
        )
        for i, output in zip(members, outputs):
            candidates = []
            for tokens, log_prob in zip(output.hypotheses, output.scores):
                length = min(len(tokens) + 1, limits[i])  # with EOS, unless the limit cut it off
                score = length_normalised(log_prob, length, length_penalty)
                candidates.append(Hypothesis(tokens=[index[p] for p in tokens], score=score))
            results[i] = max(candidates, key=lambda h: h.score)
    return [results[i] for i in range(len(sources))]


def translate_ids_native(
    translator: ctranslate2.Translator,
    sources: list[list[int]],
    vocab: list[str],
    beam_size: int = 1,
    length_penalty: float = DecodeOptions.length_penalty,
    *,
    max_len: int,
    max_len_a: float = DecodeOptions.max_len_a,
    max_len_b: int = DecodeOptions.max_len_b,
) -> list[list[int]]:
    """CTranslate2 in its own fastest mode, for timing: one call for the whole batch with the
    batch's largest length limit, one hypothesis, CT2's own length penalty, no Python callback.
    Outputs can differ from `translate` (length limits and penalty); BLEU shows by how much."""
    ids, limits = _sources_and_limits(sources, max_len, max_len_a, max_len_b)
    limit = max(limits, default=1)
    index = {piece: i for i, piece in enumerate(vocab)}
    outputs = translator.translate_batch(
        [[vocab[t] for t in s] for s in ids], max_batch_size=len(ids), beam_size=beam_size,
        length_penalty=length_penalty, max_input_length=0, max_decoding_length=limit, min_decoding_length=0,
        end_token=vocab[EOS_ID], sampling_topk=1,
    )
    return [[index[p] for p in output.hypotheses[0]] for output in outputs]


def _compare(reference: list[list[Hypothesis]], hyps: list[Hypothesis]) -> dict[str, float]:
    """Share of identical token sequences; for those, the largest score difference (it shows
    whether the logits agree, not just the argmaxes); for the others, how many CT2 outputs
    score higher under our own scoring and how many lower (in float32 beam search, CT2 higher
    means its search found a better hypothesis than ours, lower that ours found one it missed)."""
    same = [ref[0].tokens == hyp.tokens for ref, hyp in zip(reference, hyps)]
    diffs = [abs(ref[0].score - hyp.score) for ref, hyp, s in zip(reference, hyps, same) if s]
    higher = sum(hyp.score > ref[0].score for ref, hyp, s in zip(reference, hyps, same) if not s)
    return {
        "identical": sum(same) / len(same),
        "max_score_diff_identical": max(diffs, default=0.0),
        "differing_ct2_scores_higher": higher,
        "differing_ct2_scores_lower": len(same) - sum(same) - higher,
    }


def check_parity(
    run_dir: Path,
    sentences: list[str],
    beam_size: int = 4,
    length_penalty: float = DecodeOptions.length_penalty,
    intra_threads: int = 1,
) -> dict[str, dict[str, float]]:
    """CTranslate2 against our torch decoder on `sentences`, with the run's best checkpoint:
    float32 greedy, float32 beam search and int8 greedy.

    The checkpoint is loaded once and that in-memory model is both the torch reference and
    the source of both conversions, so a checkpoint replaced meanwhile cannot skew the result."""
    model, tokenizer, config = load_model(run_dir, "best")
    if not isinstance(model, Transformer):
        raise ValueError(f"{run_dir} is a {config.model.arch} run; CTranslate2 conversion needs a transformer")
    vocab = pieces(tokenizer)
    sources = tokenizer.encode(list(sentences))
    max_len = config.model.max_len
    beams = sorted({1, beam_size})
    references = {
        beam: translate_texts(model, tokenizer, sentences, DecodeOptions(beam_size=beam, length_penalty=length_penalty))
        for beam in beams
    }
    report: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="ct2-") as tmp:
        # int8 output is expected to differ somewhat: greedy is enough to say by how much.
        for quantization, quantized_beams in (("float32", beams), ("int8", [1])):
            model_dir = save_model(model, vocab, Path(tmp) / quantization, quantization)
            translator = load_translator(model_dir, compute_type=quantization, intra_threads=intra_threads)
            for beam in quantized_beams:
                hyps = translate(translator, sources, vocab, beam, length_penalty, max_len=max_len)
                name = f"{quantization}_{'greedy' if beam == 1 else f'beam{beam}'}"
                report[name] = _compare(references[beam], hyps)
                log.info("%s: %s", name, report[name])
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description="Token parity of CTranslate2 with the torch decoder.")
    parser.add_argument("run_dir", type=Path, help="a Transformer training run (its best checkpoint is used)")
    parser.add_argument("--data", type=Path, default=Path("data/en-fr/dev.tsv"), help="source TAB target lines")
    parser.add_argument("--sentences", type=int, default=200, help="how many sentences, from the top")
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--length-penalty", type=float, default=DecodeOptions.length_penalty)
    parser.add_argument("--threads", type=int, default=1, help="torch and CTranslate2 threads")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    sentences = [source for source, _ in load_tsv(args.data)[: args.sentences]]
    report = check_parity(args.run_dir, sentences, args.beam, args.length_penalty, args.threads)
    print(f"ctranslate2 {ctranslate2.__version__}, {len(sentences)} sentences of {args.data}")
    for name, result in report.items():
        print(f"{name:16s} identical {result['identical']:7.2%}   max |score diff| where identical "
              f"{result['max_score_diff_identical']:.2e}   differing: CT2 scores higher "
              f"{result['differing_ct2_scores_higher']}, lower {result['differing_ct2_scores_lower']}")


if __name__ == "__main__":
    main()
