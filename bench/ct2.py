"""CTranslate2 backend for a trained Transformer run, for benchmarking against our own engines.

The model directory is built here with CTranslate2's `TransformerSpec` API from our state dict,
not through an OpenNMT-py/fairseq converter: our checkpoints are neither, and building the spec
ourselves is the only way to be sure that CTranslate2 decodes with exactly our weights and
architecture. The choices that parity depends on, each checked against CTranslate2 4.8 source:

    positions       CT2's built-in sinusoids are [sin | cos] concatenated, with timescale
                    log(10000) / (d/2 - 1) and positions from 1; ours are Vaswani's interleaved
                    sin/cos from position 0. So our `pe` buffer is stored as explicit encodings.
    embeddings      one matrix for encoder input, decoder input and output projection (no bias);
                    CT2 scales inputs by sqrt(d_model) like we do (`scale_embeddings`).
    activation      Activation.GELU is the exact erf GELU (torch's F.gelu default), not GELUTanh.
    layer norm      pre-norm with a final norm on both stacks; epsilon copied from the model.
    special tokens  decoding starts from "<s>" and stops at "</s>"; CT2 adds nothing to the
                    source: translate() appends EOS itself, exactly as model/evaluate.py does.
    min length      CT2 forbids EOS at the first step by default (min_decoding_length=1); our
                    decoder does not, so translate() passes min_decoding_length=0.
    length limit    CT2 takes one max_decoding_length per call while ours is per sentence
                    (a * source length + b, capped at max_len - 1), so translate() decodes each
                    group of sentences that share a limit in its own call: exact, at the cost
                    of smaller batches.

What no CTranslate2 option can make identical is beam search (see `translate`).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from collections import defaultdict
from pathlib import Path

import ctranslate2
import numpy as np
from ctranslate2.specs import common_spec, transformer_spec

from model.checkpoint import load_model
from model.decode import DecodeOptions, Hypothesis
from model.tokenizer import BOS_ID, EOS_ID, UNK_ID
from model.transformer import Transformer

log = logging.getLogger(__name__)


class _Weights:
    """Our state dict as float32 numpy arrays, handed out once each: a weight that no spec
    variable takes means the spec does not describe our model, and conversion fails."""

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
    """One CT2 linear from one or more nn.Linear, fused along the output dimension (CT2 keeps
    q/k/v of self-attention as one matrix, and k/v of cross-attention as another)."""
    spec.weight = np.concatenate([weights(f"{m}.weight") for m in modules])
    spec.bias = np.concatenate([weights(f"{m}.bias") for m in modules])


def _set_layer_norm(spec: common_spec.LayerNormSpec, weights: _Weights, module: str) -> None:
    spec.gamma = weights(f"{module}.weight")
    spec.beta = weights(f"{module}.bias")


def _set_ffn(spec: transformer_spec.FeedForwardSpec, weights: _Weights, layer: str, norm: str) -> None:
    _set_layer_norm(spec.layer_norm, weights, f"{layer}.{norm}")
    _set_linear(spec.linear_0, weights, f"{layer}.ff.fc1")
    _set_linear(spec.linear_1, weights, f"{layer}.ff.fc2")


def _set_self_attention(spec, weights: _Weights, layer: str) -> None:
    attn = f"{layer}.self_attn"
    _set_layer_norm(spec.layer_norm, weights, f"{layer}.ln1")
    _set_linear(spec.linear[0], weights, f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj")
    _set_linear(spec.linear[1], weights, f"{attn}.out_proj")


def _set_cross_attention(spec, weights: _Weights, layer: str) -> None:
    attn = f"{layer}.cross_attn"
    _set_layer_norm(spec.layer_norm, weights, f"{layer}.ln2")
    _set_linear(spec.linear[0], weights, f"{attn}.q_proj")
    _set_linear(spec.linear[1], weights, f"{attn}.k_proj", f"{attn}.v_proj")
    _set_linear(spec.linear[2], weights, f"{attn}.out_proj")


def build_spec(model: Transformer, vocab: list[str]) -> transformer_spec.TransformerSpec:
    """A validated TransformerSpec holding `model`'s weights, with `vocab` (piece i = id i) as
    source and target vocabulary."""
    cfg = model.config
    if len(vocab) != cfg.vocab_size:
        raise ValueError(f"vocabulary has {len(vocab)} pieces, the model {cfg.vocab_size} embeddings")
    if len(set(vocab)) != len(vocab):
        raise ValueError("vocabulary pieces are not unique: CTranslate2 maps tokens to ids by string")
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
    positions = model.positions.pe.detach().cpu().float().numpy()  # a buffer outside the state dict

    spec.encoder.embeddings[0].weight = embedding
    spec.encoder.position_encodings.encodings = positions
    _set_layer_norm(spec.encoder.layer_norm, weights, "encoder_norm")
    for i, layer in enumerate(spec.encoder.layer):
        _set_self_attention(layer.self_attention, weights, f"encoder_layers.{i}")
        _set_ffn(layer.ffn, weights, f"encoder_layers.{i}", "ln2")

    spec.decoder.embeddings.weight = embedding
    spec.decoder.position_encodings.encodings = positions
    spec.decoder.projection.weight = embedding  # tied output projection, no bias
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


def convert(run_dir: Path, out_dir: Path, quantization: str | None = None) -> Path:
    """Build a ctranslate2 TransformerSpec with our weights and save it to out_dir (model.bin +
    vocabularies), overwriting a model already there.

    quantization is CT2's weight type (int8, int8_float32, float16, ...); None keeps float32.
    The three uses of the shared embedding are stored once (CT2 aliases equal variables)."""
    model, tokenizer, config = load_model(run_dir, "best")
    if not isinstance(model, Transformer):
        raise ValueError(f"{run_dir} is a {config.model.arch} run; CTranslate2 conversion needs a transformer")
    vocab = [tokenizer.sp.id_to_piece(i) for i in range(tokenizer.vocab_size)]
    spec = build_spec(model, vocab)
    spec.optimize(quantization=quantization)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec.save(str(out_dir))
    log.info("%s converted to %s (%s)", run_dir, out_dir, quantization or "float32")
    return out_dir


def read_vocabulary(model_dir: Path) -> list[str]:
    """The pieces of a converted model, in id order."""
    import json

    return json.loads((Path(model_dir) / "shared_vocabulary.json").read_text(encoding="utf-8"))


def load_translator(
    model_dir: Path, device: str = "cpu", compute_type: str = "float32", intra_threads: int = 0
) -> ctranslate2.Translator:
    """A Translator on one worker (inter_threads=1); intra_threads=0 lets CT2 pick."""
    return ctranslate2.Translator(
        str(model_dir), device=device, compute_type=compute_type, inter_threads=1, intra_threads=intra_threads
    )


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
    """Best hypothesis per source (spm ids without EOS), in input order.

    Sources are cut to max_len - 1 and get EOS appended, as in model/evaluate.py, and each is
    decoded with our limit int(a * (length + 1) + b) capped at max_len - 1 target tokens.
    The score is the log-probability normalised with length_penalty as CTranslate2 does it.
    """
    ids = [s[: max_len - 1] + [EOS_ID] for s in sources]
    limits = [min(int(max_len_a * len(s) + max_len_b), max_len - 1) for s in ids]
    groups: dict[int, list[int]] = defaultdict(list)
    for i, limit in enumerate(limits):
        groups[limit].append(i)
    index = {piece: i for i, piece in enumerate(vocab)}
    results: list[Hypothesis | None] = [None] * len(sources)
    for limit, members in groups.items():
        outputs = translator.translate_batch(
            [[vocab[t] for t in ids[i]] for i in members],
            max_batch_size=max_batch_size,
            beam_size=beam_size,
            length_penalty=length_penalty,
            max_input_length=0,  # already cut to max_len, as our model sees them
            max_decoding_length=limit,
            min_decoding_length=0,
            end_token=vocab[EOS_ID],
            return_scores=True,
            sampling_topk=1,
        )
        for i, output in zip(members, outputs):
            results[i] = Hypothesis(tokens=[index[p] for p in output.hypotheses[0]], score=output.scores[0])
    return results


def translate_ids(
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
) -> list[list[int]]:
    """Token ids in (spm ids, no EOS), token ids out (without BOS/EOS); see `translate`."""
    hyps = translate(
        translator, sources, vocab, beam_size, length_penalty, max_batch_size,
        max_len=max_len, max_len_a=max_len_a, max_len_b=max_len_b,
    )
    return [h.tokens for h in hyps]
