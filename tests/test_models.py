"""Attention mechanisms and every architecture of the zoo, on tiny random inputs."""

from __future__ import annotations

import itertools

import pytest
import torch

from attnserve.model.attention import SCORES, MultiHeadAttention, build_rnn_attention
from attnserve.model.config import ModelConfig
from attnserve.model.decode import DecodeOptions, beam_search, greedy
from attnserve.model.zoo import build_model

V = 60


def padded_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, V, (3, 9), generator=g)
    src[1, 6:] = 0  # padding
    src[2, 2:] = 0
    tgt = torch.randint(4, V, (3, 7), generator=g)
    return src, tgt


def tiny(arch: str, **overrides) -> ModelConfig:
    base = dict(arch=arch, vocab_size=V, d_model=32, hidden=16, attn_dim=16, d_ff=64, n_heads=4,
                enc_layers=2, dec_layers=2, dropout=0.0, window=2, max_len=64)
    return ModelConfig(**{**base, **overrides})


RNN_VARIANTS = [
    tiny("rnn", decoder=d, attention=a, score=s, cell=c)
    for d, a, s, c in itertools.product(("bahdanau", "luong"), ("global", "local"), sorted(SCORES), ("gru", "lstm"))
] + [tiny("rnn", decoder="bahdanau", attention="none", cell=c) for c in ("gru", "lstm")]
ALL_VARIANTS = [tiny("transformer")] + RNN_VARIANTS
ids = [f"{c.label}-{c.cell}" if c.arch == "rnn" else c.label for c in ALL_VARIANTS]


@pytest.mark.parametrize("kind, score", [(k, s) for k in ("global", "local") for s in sorted(SCORES)] + [("none", "")])
def test_attention_weights_sum_to_one_and_are_zero_on_padding(kind: str, score: str) -> None:
    torch.manual_seed(0)
    attention = build_rnn_attention(kind, score or "dot", query_dim=8, key_dim=8, attn_dim=6, window=2)
    memory = torch.randn(3, 10, 8)  # (B, S, C)
    lengths = torch.tensor([10, 7, 1])
    mask = torch.arange(10)[None, :] < lengths[:, None]
    query = torch.randn(3, 5, 8)  # (B, T, C)
    context, weights = attention(query, attention.project_keys(memory), memory, mask, lengths)
    assert weights.shape == (3, 5, 10) and context.shape == (3, 5, 8)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 5))
    assert (weights.masked_select(~mask[:, None, :].expand_as(weights)) == 0).all()
    assert (weights >= 0).all()
    if kind == "local":  # nothing outside the window of half-width D around p_t
        assert ((weights > 0).sum(-1) <= 2 * attention.window + 1).all()


def test_multi_head_attention_weights_and_fused_path_agree() -> None:
    torch.manual_seed(0)
    mha = MultiHeadAttention(d_model=16, n_heads=4).eval()
    x, memory = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)[:, None, None, :]
    k, v = mha.project_kv(memory)
    explicit, weights = mha(x, k, v, mask, need_weights=True)
    fused, _ = mha(x, k, v, mask)
    torch.testing.assert_close(explicit, fused, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 3))
    assert (weights[1, :, :, 2:] == 0).all()


@pytest.mark.parametrize("cfg", ALL_VARIANTS, ids=ids)
def test_every_model_returns_alignment_and_decodes_incrementally(cfg: ModelConfig) -> None:
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    src, tgt = padded_batch()
    logits, attention = model(src, tgt, return_attention=True)
    assert logits.shape == (3, 7, V) and attention.shape == (3, 7, 9)
    torch.testing.assert_close(attention.sum(-1), torch.ones(3, 7))
    assert (attention[1, :, 6:] == 0).all() and (attention[2, :, 2:] == 0).all()
    # Step-by-step decoding with the cache gives the teacher-forced logits: what export relies on.
    state, steps = model.encode(src), []
    for t in range(tgt.size(1)):
        step_logits, state, step_attention = model.decode_step(tgt[:, t], state)
        torch.testing.assert_close(step_attention, attention[:, t], atol=1e-5, rtol=1e-4)
        steps.append(step_logits)
    torch.testing.assert_close(torch.stack(steps, 1), logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cfg", [ALL_VARIANTS[0], RNN_VARIANTS[0], RNN_VARIANTS[-1]], ids=["transformer", "bahdanau", "noattn"])
def test_gradients_reach_every_parameter(cfg: ModelConfig) -> None:
    torch.manual_seed(0)
    model = build_model(cfg).train()
    src, tgt = padded_batch()
    loss = torch.nn.functional.cross_entropy(model(src, tgt).flatten(0, 1), tgt.flatten(), ignore_index=0)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"no gradient reaches {name}"


@pytest.mark.parametrize("cfg", [ALL_VARIANTS[0]] + RNN_VARIANTS[::5], ids=lambda c: c.label + "-" + c.cell)
def test_beam_search_with_beam_one_is_greedy(cfg: ModelConfig) -> None:
    torch.manual_seed(1)
    model = build_model(cfg).eval()
    src, _ = padded_batch(seed=3)
    greedy_hyps = greedy(model, src)
    beam_hyps = beam_search(model, src, DecodeOptions(beam_size=1))
    assert [h[0].tokens for h in greedy_hyps] == [h[0].tokens for h in beam_hyps]
    for g, b in zip(greedy_hyps, beam_hyps):
        assert g[0].score == pytest.approx(b[0].score, abs=1e-4)


def test_beam_search_nbest_is_sorted_and_attention_matches_tokens() -> None:
    torch.manual_seed(0)
    model = build_model(tiny("transformer")).eval()
    src, _ = padded_batch()
    results = beam_search(model, src, DecodeOptions(beam_size=4, nbest=3, return_attention=True, max_len_a=0, max_len_b=12))
    for hyps in results:
        assert len(hyps) == 3
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
        for h in hyps:
            assert h.attention is not None and len(h.attention) in (len(h.tokens), len(h.tokens) + 1)
    with pytest.raises(ValueError, match="nbest"):
        beam_search(model, src, DecodeOptions(beam_size=2, nbest=3))


def test_unknown_configs_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown architecture"):
        ModelConfig(arch="lstm-transformer")
    with pytest.raises(ValueError, match="unknown attention score"):
        build_model(tiny("rnn", score="cosine"))
    with pytest.raises(ValueError, match="dot attention needs equal"):
        build_rnn_attention("global", "dot", 8, 6, 4, 2)


@pytest.mark.parametrize("beam", [1, 3])
def test_output_does_not_depend_on_batch_companions(beam: int) -> None:
    """Each sentence has its own length limit: decoding it alone or beside longer sentences gives
    the same tokens (untrained models rarely emit EOS, so the limit decides their length)."""
    torch.manual_seed(0)
    model = build_model(tiny("transformer")).eval()
    src, _ = padded_batch()
    opts = DecodeOptions(beam_size=beam, max_len_a=1.0, max_len_b=2)
    together = beam_search(model, src, opts) if beam > 1 else greedy(model, src, opts)
    for i in range(src.size(0)):
        alone_src = src[i : i + 1, : int((src[i] != 0).sum())]
        alone = beam_search(model, alone_src, opts) if beam > 1 else greedy(model, alone_src, opts)
        assert alone[0][0].tokens == together[i][0].tokens
        assert len(together[i][0].tokens) <= 1.0 * alone_src.size(1) + 2
