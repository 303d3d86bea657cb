"""Attention-weight normalisers beside softmax (model/normalisers.py): sparsemax against its
closed form, the CRF marginals against brute-force enumeration, gradients, RNN models that use
them, and their export with parity."""

from __future__ import annotations

import itertools
from pathlib import Path

import onnx
import pytest
import torch
import torch.nn.functional as F

from attnserve.model.attention import build_rnn_attention
from attnserve.model.normalisers import NORMALISERS, crf_marginals, sparsemax
from attnserve.model.zoo import build_model
from tests.test_models import padded_batch, tiny

STRUCTURED = ("sparsemax", "crf")


def lengths_mask(lengths: list[int], S: int) -> torch.Tensor:
    return torch.arange(S)[None, :] < torch.tensor(lengths)[:, None]  # (B, S)


def normalise(name: str, scores: torch.Tensor, mask: torch.Tensor, pairwise: torch.Tensor | None = None) -> torch.Tensor:
    if name == "sparsemax":
        return sparsemax(scores, mask)
    return crf_marginals(scores, torch.zeros(2, 2, dtype=scores.dtype) if pairwise is None else pairwise, mask)


@pytest.mark.parametrize("name", STRUCTURED)
def test_weights_sum_to_one_and_are_zero_on_padding(name: str) -> None:
    torch.manual_seed(0)
    mask = lengths_mask([10, 7, 1], 10)[:, None, :]  # (B, 1, S)
    scores = 3 * torch.randn(3, 5, 10)  # (B, T, S)
    weights = normalise(name, scores, mask, pairwise=torch.randn(2, 2))
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 5))
    assert (weights.masked_select(~mask.expand_as(weights)) == 0).all()
    assert (weights >= 0).all() and torch.isfinite(weights).all()
    # Huge scores on padding change nothing: the masked positions are out of the computation.
    loud = normalise(name, scores.masked_fill(~mask, 1e6), mask, pairwise=None)
    torch.testing.assert_close(loud, normalise(name, scores, mask, pairwise=None))
    # Inside GlobalAttention, as a decoder uses it.
    attention = build_rnn_attention("global", "additive", 8, 8, 6, 2, normaliser=name)
    memory, query = torch.randn(3, 10, 8), torch.randn(3, 5, 8)
    context, weights = attention(query, attention.project_keys(memory), memory, mask[:, 0])
    assert context.shape == (3, 5, 8)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 5))
    assert (weights.masked_select(~mask.expand_as(weights)) == 0).all()


def sparsemax_reference(z: list[float]) -> list[float]:
    """Martins & Astudillo 2016, Algorithm 1, one row in plain Python."""
    ordered = sorted(z, reverse=True)
    k = max(k for k in range(1, len(z) + 1) if 1 + k * ordered[k - 1] > sum(ordered[:k]))
    tau = (sum(ordered[:k]) - 1) / k
    return [max(v - tau, 0.0) for v in z]


@pytest.mark.parametrize("scale", [0.1, 1.0, 5.0])
def test_sparsemax_matches_its_closed_form_with_exact_zeros(scale: float) -> None:
    g = torch.Generator().manual_seed(int(10 * scale))
    lengths = [12, 9, 5, 1]
    mask = lengths_mask(lengths, 12)[:, None, :]  # (B, 1, S)
    scores = scale * torch.randn(4, 3, 12, generator=g, dtype=torch.float64)
    weights = sparsemax(scores, mask)
    for b, n in enumerate(lengths):
        for t in range(3):
            expected = sparsemax_reference(scores[b, t, :n].tolist()) + [0.0] * (12 - n)
            torch.testing.assert_close(weights[b, t], torch.tensor(expected, dtype=torch.float64))
    if scale == 5.0:  # spread-out scores: most valid positions get exactly 0
        valid = weights.masked_select(mask.expand_as(weights))
        assert (valid == 0).float().mean() > 0.5
    # The other dim, as the closed form is per row wherever the row is.
    torch.testing.assert_close(sparsemax(scores.transpose(1, 2), mask.transpose(1, 2), dim=1),
                               weights.transpose(1, 2))
    # The projection: no closer point of the simplex (it beats softmax's and a random one's distance).
    row, n = scores[0, 0], 12
    for other in (torch.softmax(row, -1), torch.distributions.Dirichlet(torch.ones(n, dtype=torch.float64)).sample()):
        assert (weights[0, 0] - row).norm() <= (other - row).norm()


def crf_brute_force(unary: torch.Tensor, pairwise: torch.Tensor) -> torch.Tensor:
    """P(z_i = 1) for every i by enumerating all 2^n labelings of the n positions."""
    n = unary.numel()
    total, ones = unary.new_zeros(()), unary.new_zeros(n)
    for labels in itertools.product((0, 1), repeat=n):
        z = torch.tensor(labels)
        potential = (unary * z).sum() + sum(pairwise[z[i], z[i + 1]] for i in range(n - 1))
        total = total + potential.exp()
        ones = ones + potential.exp() * z
    return ones / total


@pytest.mark.parametrize("n", range(1, 7))
def test_crf_marginals_equal_brute_force_enumeration(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    S = 8
    unary = 2 * torch.randn(S, generator=g, dtype=torch.float64)
    pairwise = 2 * torch.randn(2, 2, generator=g, dtype=torch.float64)
    mask = torch.arange(S) < n
    marginals = crf_brute_force(unary[:n], pairwise)
    expected = torch.cat([marginals / marginals.sum(), torch.zeros(S - n, dtype=torch.float64)])
    torch.testing.assert_close(crf_marginals(unary, pairwise, mask), expected)
    # A gap inside the sentence joins its neighbours into one chain.
    gap = torch.ones(S, dtype=torch.bool)
    gap[torch.randperm(S, generator=g)[: S - n]] = False
    marginals = crf_brute_force(unary[gap], pairwise)
    expected = torch.zeros(S, dtype=torch.float64).masked_scatter(gap, marginals / marginals.sum())
    torch.testing.assert_close(crf_marginals(unary, pairwise, gap), expected)


def test_crf_with_zero_transitions_is_independent_sigmoids_and_batches() -> None:
    torch.manual_seed(0)
    unary = torch.randn(3, 4, 9, dtype=torch.float64)
    mask = lengths_mask([9, 4, 2], 9)[:, None, :]
    weights = crf_marginals(unary, torch.zeros(2, 2, dtype=torch.float64), mask)
    expected = torch.sigmoid(unary) * mask
    torch.testing.assert_close(weights, expected / expected.sum(-1, keepdim=True))
    # Each (B, T) query is its own chain: batched equals one at a time.
    pairwise = torch.randn(2, 2, dtype=torch.float64)
    batched = crf_marginals(unary, pairwise, mask)
    for b, t in itertools.product(range(3), range(4)):
        torch.testing.assert_close(batched[b, t], crf_marginals(unary[b, t], pairwise, mask[b, 0]))
    # Scores far beyond exp's range stay finite and still sum to 1.
    extreme = crf_marginals(200 * unary, pairwise, mask)
    assert torch.isfinite(extreme).all()
    torch.testing.assert_close(extreme.sum(-1), torch.ones(3, 4, dtype=torch.float64))


@pytest.mark.parametrize("name", STRUCTURED)
def test_gradcheck(name: str) -> None:
    torch.manual_seed(0)
    mask = lengths_mask([6, 4], 6)[:, None, :]  # (B, 1, S)
    scores = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    if name == "sparsemax":
        assert torch.autograd.gradcheck(lambda s: sparsemax(s, mask), (scores,))
        return
    pairwise = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s, w: crf_marginals(s, w, mask), (scores, pairwise))


def test_softmax_checkpoints_are_unchanged_and_bad_normalisers_are_refused() -> None:
    assert sorted(NORMALISERS) == ["crf", "softmax", "sparsemax"]
    softmax_model = build_model(tiny("rnn"))
    assert not [name for name in softmax_model.state_dict() if "normaliser" in name]
    assert tiny("rnn").label == "gru-bahdanau-global-additive"
    crf = build_model(tiny("rnn", normaliser="crf"))
    assert set(crf.state_dict()) - set(softmax_model.state_dict()) == {"decoder.attention.normaliser.transition"}
    assert tiny("rnn", normaliser="sparsemax").label == "gru-bahdanau-global-additive-sparsemax"
    with pytest.raises(ValueError, match="unknown attention normaliser"):
        tiny("rnn", normaliser="entmax")
    with pytest.raises(ValueError, match="RNN global attention only"):
        tiny("transformer", normaliser="sparsemax")
    with pytest.raises(ValueError, match="RNN global attention only"):
        tiny("rnn", attention="local", normaliser="crf")
    with pytest.raises(ValueError, match="needs global attention"):
        build_rnn_attention("local", "dot", 8, 8, 4, 2, normaliser="sparsemax")
    with pytest.raises(ValueError, match="unknown attention normaliser"):
        build_rnn_attention("global", "dot", 8, 8, 4, 2, normaliser="entmax")


@pytest.mark.parametrize("name", STRUCTURED)
def test_rnn_bahdanau_fits_a_tiny_set(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(tiny("rnn", decoder="bahdanau", score="additive", enc_layers=1, normaliser=name)).train()
    src, tgt = padded_batch()  # 3 pairs, two of them padded
    tgt_in, tgt_out = tgt[:, :-1], tgt[:, 1:]
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(200):
        loss = F.cross_entropy(model(src, tgt_in).flatten(0, 1), tgt_out.flatten())
        if step == 0:
            initial = loss.item()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if loss.item() < 0.05:
            break
    assert loss.item() < 0.02 * initial, (initial, loss.item())
    model.eval()
    with torch.no_grad():
        logits, attention = model(src, tgt_in, return_attention=True)
    assert (logits.argmax(-1) == tgt_out).all()
    mask = (src != 0)[:, None, :].expand_as(attention)
    torch.testing.assert_close(attention.sum(-1), torch.ones(3, 6))
    assert (attention.masked_select(~mask) == 0).all()
    if name == "crf":  # the transition potentials learn too
        assert model.decoder.attention.normaliser.transition.detach().abs().sum() > 0


# ------------------------------------------------------------------------------------------
# Export


@pytest.fixture(scope="module")
def structured_runs(tmp_path_factory) -> dict[str, Path]:
    """A Bahdanau run per structured normaliser, a few steps on a small toy corpus: parity does
    not need a good model, only a real checkpoint and dev/test splits."""
    from attnserve.model.train import run_training
    from tests.test_training import toy_config, write_toy_corpus

    root = tmp_path_factory.mktemp("structured")
    corpus = write_toy_corpus(root / "corpus", train=200, dev=12, test=12)
    runs = {}
    for name in STRUCTURED:
        config = toy_config(corpus, root / name, arch="rnn", decoder="bahdanau", attention="global",
                            score="additive", normaliser=name)
        config.train.max_steps = config.train.eval_every = 30
        run_training(config)
        runs[name] = root / name
    return runs


@pytest.mark.parametrize("name", STRUCTURED)
def test_structured_attention_exports_with_parity(structured_runs: dict[str, Path], tmp_path: Path, name: str) -> None:
    from attnserve.export.exporter import export_bundle
    from attnserve.export.specs import architecture_spec
    from attnserve.export.validate import step_parity
    from attnserve.model.checkpoint import load_model
    from attnserve.model.evaluate import translate_best
    from attnserve.server.bundle import load_bundle
    from attnserve.server.engine import Engine

    out = tmp_path / "repo" / name / "1"
    manifest = export_bundle(structured_runs[name], out, precisions=("fp32",)).to_json()
    assert manifest["attention"] == f"global additive {name}" and manifest["label"].endswith(f"-{name}")
    fp32 = manifest["precisions"]["fp32"]["validation"]
    assert fp32["max_abs_diff_random"] <= 1e-4 and fp32["max_abs_diff_dev"] <= 1e-4
    assert fp32["greedy_identical"] == 1.0 and fp32["beam4_identical"] == 1.0
    ops = [n.op_type for n in onnx.load(str(out / "fp32" / "decoder_step.onnx")).graph.node]
    assert "Loop" not in ops and "Scan" not in ops  # plain ops, a fixed graph for any source length
    model, tokenizer, config = load_model(structured_runs[name])
    if name == "sparsemax":
        assert "CumSum" in ops and "Softmax" not in ops
    else:  # the scan's depth is fixed by max_len: log2(max_len) doublings (a Max each) + the final sum
        assert ops.count("Max") == (config.model.max_len - 1).bit_length() + 1
    engine = Engine(load_bundle(out), "fp32", device="cpu")
    sources = ["the red cat sees the dog", "the old house has the big green car"]
    assert engine.translate_text(sources) == translate_best(model, tokenizer, sources)
    # The longest source the model reads (max_len), far longer than the export's example.
    g = torch.Generator().manual_seed(2)
    src = torch.randint(4, config.model.vocab_size, (2, config.model.max_len), generator=g)
    src[1, 20:] = 0
    for difference in step_parity(model, engine, architecture_spec(model), src, steps=3).values():
        assert difference.absolute <= 1e-4
