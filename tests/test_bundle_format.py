"""The typed contract between export and serving (attnserve/bundle_format.py) and the shared
decoding rules (attnserve/decoding_rules.py): manifests round-trip, other format versions and
malformed manifests are refused with every problem named, and both sides apply one rule."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from attnserve.bundle_format import (
    FORMAT_VERSION, MANIFEST_FILE, FormatVersionError, Manifest, ManifestError, StepSignature, TensorSignature,
)
from attnserve.decoding_rules import (
    EOS_ID, LengthLimit, length_normalised, max_source_tokens, max_target_length, source_ids,
)
from attnserve.server.bundle import load_bundle
from attnserve.server.engine import Engine
from tests.conftest import ARCHITECTURES, SHIPPED_BUNDLE

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = SHIPPED_BUNDLE / MANIFEST_FILE


def test_the_shipped_manifest_round_trips_byte_for_byte() -> None:
    text = SHIPPED.read_text()
    manifest = Manifest.from_json(json.loads(text), str(SHIPPED))
    assert manifest.format_version == FORMAT_VERSION  # the shipped bundle is of the current format
    assert manifest.to_json() == json.loads(text)
    assert manifest.dumps() == text  # the exporter writes exactly this
    assert manifest.state.search_outputs[:4] == ("top_log_probs", "top_ids", "forced_log_probs", "attention")
    assert manifest.validation_of("fp32").beam4_identical == 1.0 and manifest.validation_of("int8") is None


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_fresh_exports_round_trip(bundles, name: str) -> None:
    path = bundles[name] / MANIFEST_FILE
    data = json.loads(path.read_text())
    manifest = Manifest.read(path)
    assert manifest.to_json() == data and manifest.dumps() == path.read_text()
    assert Manifest.from_json(manifest.to_json()) == manifest
    assert load_bundle(bundles[name]).manifest == manifest
    # Records are read-only: a manifest does not change under the engine that reads it.
    with pytest.raises(TypeError):
        manifest.files["spm.model"] = "0" * 64  # type: ignore[index]


def test_another_format_version_is_refused_naming_both(bundles, tmp_path: Path) -> None:
    copy = tmp_path / "v2"
    shutil.copytree(bundles["transformer"], copy)
    data = json.loads((copy / MANIFEST_FILE).read_text())
    (copy / MANIFEST_FILE).write_text(json.dumps({**data, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(FormatVersionError, match=rf"version {FORMAT_VERSION + 1}; this attnserve reads 'attnserve-bundle' version {FORMAT_VERSION}"):
        Engine(load_bundle(copy), "fp32", device="cpu")
    with pytest.raises(FormatVersionError, match="format 'something-else'"):
        Manifest.from_json({**data, "format": "something-else"})
    with pytest.raises(FormatVersionError, match="version None"):
        Manifest.from_json({k: v for k, v in data.items() if k != "format_version"})
    with pytest.raises(FormatVersionError):  # nor can one be made in code
        dataclasses.replace(Manifest.from_json(data), format_version=FORMAT_VERSION + 1)


def test_a_malformed_manifest_lists_every_problem(bundles) -> None:
    data = json.loads((bundles["bahdanau"] / MANIFEST_FILE).read_text())
    del data["tokenizer"]
    data["vocab_size"] = "8000"
    data["state"]["dynamic"][0]["shape"] = ["batch", 2.5]
    data["precisions"]["fp32"]["validation"]["greedy_identical"] = True
    data["surprise"] = 1
    with pytest.raises(ManifestError) as error:
        Manifest.from_json(data, "m.json")
    problems = error.value.problems
    assert any(p == "tokenizer: missing" for p in problems)
    assert any(p.startswith("vocab_size: int expected") for p in problems)
    assert any(p.startswith("state.dynamic[0].shape[1]:") for p in problems)
    assert any(p.startswith("precisions.fp32.validation.greedy_identical:") for p in problems)
    assert any(p == "surprise: unknown field" for p in problems)
    assert len(problems) == 5 and str(error.value).startswith("m.json: invalid manifest")


def test_step_signature_names_the_graph_tensors() -> None:
    signature = StepSignature(
        static=(TensorSignature("src_mask", "bool", ("batch", "src_len")),),
        dynamic=(TensorSignature("self_k0", "float32", ("batch", 4, "past", 64)), TensorSignature("tgt_pos", "int64", ("batch",))),
        dynamic_from_encoder=False)
    assert signature.step_inputs == ("prev", "origin", "fresh", "src_mask", "self_k0", "tgt_pos", "k", "forced")
    assert signature.new_state_outputs == ("new_self_k0", "new_tgt_pos")
    assert signature.encoder_outputs == ("src_mask",)
    assert signature.source_axes() == {"src_mask": 1} and signature.past_axes() == {"self_k0": 2}
    assert StepSignature.from_json(signature.to_json()) == signature


# -- the shared decoding rules ---------------------------------------------------------------------


def test_the_length_limit_is_float32_arithmetic_as_torch_and_numpy_compute_it() -> None:
    import torch

    rng = random.Random(0)
    for _ in range(2000):
        a, b = rng.choice([rng.random() * 3, 1.1, 1.2, 0.3, 2.0, 1 / 3]), rng.randint(0, 20)
        lengths = [rng.randint(1, 300) for _ in range(16)]
        ours = [max_target_length(n, 256, LengthLimit(a, b)) for n in lengths]
        assert ours == (a * torch.tensor(lengths).float() + b).long().clamp(max=255).tolist()
        assert ours == [min(int(np.float32(a) * np.float32(n) + np.float32(b)), 255) for n in lengths]


def test_the_reference_and_the_engine_share_the_rules(bundles, trained) -> None:
    import torch

    from attnserve.model.checkpoint import load_model
    from attnserve.model.decode import DecodeOptions, max_target_lengths
    from attnserve.server.search import TranslationOptions, target_length_limit

    model, _, _ = load_model(trained["transformer"])
    engine = Engine(load_bundle(bundles["transformer"]), "fp32", device="cpu")
    src = torch.tensor([[5, 6, 7, EOS_ID], [5, EOS_ID, 0, 0]])
    for a, b in ((2.0, 10), (1.3, 3), (0.0, 4)):
        reference = max_target_lengths(src, model, DecodeOptions(max_len_a=a, max_len_b=b)).tolist()
        assert reference == [target_length_limit(engine, n, TranslationOptions(max_len_a=a, max_len_b=b), None) for n in (4, 2)]
    assert engine.default_length_limit == LengthLimit(DecodeOptions.max_len_a, DecodeOptions.max_len_b)
    long_text = " ".join(["the red cat"] * 200)
    ids = engine.encode_texts([long_text])[0]
    assert len(ids) == engine.max_len and ids[-1] == EOS_ID == engine.eos
    assert ids == source_ids(engine.tokenizer.encode(long_text), engine.max_len)
    assert max_source_tokens(engine.max_len) == engine.max_source_tokens == engine.max_len - 1
    engine.close()


def test_length_penalty_and_source_ids() -> None:
    assert length_normalised(-6.0, 7, 1.0) == pytest.approx(-6.0 / 2.0)
    assert length_normalised(-6.0, 7, 0.0) == -6.0
    assert source_ids([9] * 10, max_len=5) == [9, 9, 9, 9, EOS_ID]
    assert source_ids([], max_len=5) == [EOS_ID]


def test_the_shared_modules_are_pure_python() -> None:
    """Both model/ and server/ import them: no torch, numpy or onnxruntime behind them."""
    code = ("import sys\nfor name in ('torch', 'numpy', 'onnxruntime', 'onnx', 'sentencepiece'):\n    sys.modules[name] = None\n"
            "import attnserve.decoding_rules, attnserve.bundle_format\n")
    done = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
