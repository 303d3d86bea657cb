"""The side-by-side benchmark compares every engine at its best setting: each engine is measured
in every thread count (and CTranslate2 in every CT2_USE_MKL value), and the table keeps, per
engine, beam and batch, the fastest, with the setting that gave it."""

from __future__ import annotations

from pathlib import Path

from attnserve.bench.benchmark import best_of, build_parser, settings, table
from tests.conftest import SHIPPED_BUNDLE


def result(engine: str, threads: int, sent_s: float, mkl: str = "", beam: int = 4, batch: int = 1) -> dict:
    return {"engine": engine, "beam": beam, "batch": batch, "threads": threads, "ct2_use_mkl": mkl,
            "sentences_per_s": sent_s, "tokens_per_s": 10 * sent_s, "peak_rss_mb": 100.0, "bleu": 48.0}


def test_ctranslate2_is_searched_over_backends_and_the_others_over_threads() -> None:
    assert settings("ct2-int8", [1, 2], ["0", "1"]) == [
        {"threads": 1, "instances": 1, "ct2_use_mkl": "0", "spin_step": False},
        {"threads": 1, "instances": 1, "ct2_use_mkl": "1", "spin_step": False},
        {"threads": 2, "instances": 1, "ct2_use_mkl": "0", "spin_step": False},
        {"threads": 2, "instances": 1, "ct2_use_mkl": "1", "spin_step": False}]
    # this engine: with 2 threads, also with its step session's workers spinning
    assert settings("onnx-fp32", [1, 2], ["0", "1"]) == [
        {"threads": 1, "instances": 1, "ct2_use_mkl": "", "spin_step": False},
        {"threads": 2, "instances": 1, "ct2_use_mkl": "", "spin_step": False},
        {"threads": 2, "instances": 1, "ct2_use_mkl": "", "spin_step": True}]
    assert settings("torch", [1, 2], ["0", "1"]) == [
        {"threads": 1, "instances": 1, "ct2_use_mkl": "", "spin_step": False},
        {"threads": 2, "instances": 1, "ct2_use_mkl": "", "spin_step": False}]
    assert "2 threads, step spinning |" in table([dict(result("onnx-fp32", 2, 50.0), spin_step=True)])
    args = build_parser().parse_args(["--run", "r", "--bundle", "b"])
    assert args.threads == [1, 2] and args.ct2_mkl == ["0", "1"] and args.instances == [1, 2]  # the search is the default


def test_parallel_instances_are_searched_on_the_same_cores() -> None:
    """With 2 instances the thread count is each one's: 2 x 1 thread on 2 cores, never 2 x 2;
    CTranslate2's instances are its inter_threads, named so in the table."""
    layouts = lambda engine: [(s["instances"], s["threads"], s["spin_step"]) for s in settings(engine, [1, 2], ["0"], [1, 2])]
    assert layouts("onnx-int8") == [(1, 1, False), (1, 2, False), (1, 2, True), (2, 1, False)]
    assert layouts("ct2-int8") == [(1, 1, False), (1, 2, False), (2, 1, False)]
    assert layouts("torch") == [(1, 1, False), (1, 2, False), (2, 1, False)]
    text = table([dict(result("ct2-int8", 1, 90.0, "0"), instances=2), result("ct2-int8", 1, 80.0, "0")])
    assert "| 2 instances x 1 thread (inter_threads), CT2_USE_MKL=0 |" in text


def test_parallel_instances_decode_every_batch_once(tmp_path) -> None:
    """measure() with 2 instances: every batch decoded once, to the same output as one instance."""
    from attnserve.bench.benchmark import measure

    split = tmp_path / "split.tsv"
    split.write_text("".join(f"{s}\t{t}\n" for s, t in [
        ("Open the file.", "Ouvrir le fichier."), ("Close the window.", "Fermer la fenêtre."),
        ("Save the document.", "Enregistrer le document."), ("Quit the application.", "Quitter l’application."),
        ("Print the page.", "Imprimer la page."), ("Delete the folder?", "Supprimer le dossier ?"),
        ("Cancel", "Annuler")]), encoding="utf-8")
    run = Path(__file__).resolve().parents[1] / "models" / "transformer-en-fr-v2"
    one, two = (measure("onnx-fp32", run, SHIPPED_BUNDLE, split, 7, beam=2, batch=2, threads=1, workdir=tmp_path,
                        instances=n) for n in (1, 2))
    assert two["instances"] == 2 and two["sentences"] == 7
    assert (two["target_tokens"], two["bleu"]) == (one["target_tokens"], one["bleu"]) and one["bleu"] > 0


def test_each_engine_is_compared_at_its_best_setting() -> None:
    results = [dict(result("onnx-int8", 1, 73.8), batch_p50_ms=11.94, batch_p99_ms=20.5), result("onnx-int8", 2, 43.1),
               result("ct2-int8", 1, 87.3, "0"), result("ct2-int8", 1, 6.4, "1"), result("ct2-int8", 2, 11.8, "0"),
               result("torch", 1, 11.2), result("torch", 2, 9.5)]
    best = {r["engine"]: r for r in best_of(results)}
    assert (best["onnx-int8"]["threads"], best["ct2-int8"]["ct2_use_mkl"], best["torch"]["threads"]) == (1, "0", 1)
    text = table(results)
    row = next(line for line in text.splitlines() if "| onnx-int8 |" in line)
    assert "1 thread |" in row and f"{73.8 / 87.3:.2f}x" in row and f"{73.8 / 11.2:.2f}x" in row  # best against best
    assert "| 11.9 / 20.5 |" in row  # its latency per batch: at batch 1, per request
    assert "1 thread, CT2_USE_MKL=0" in text and text.count("| ct2-int8 |") == 1


def test_the_step_profile_sums_every_kernel_of_a_real_step(tmp_path) -> None:
    """bench/step_profile.py on the shipped bundle: the per-op rows add up to the kernel total,
    each op's node count is what the graph holds, and a second graph runs on the same feed."""
    import collections
    import json

    import onnx

    from attnserve.bench import step_profile

    bundle = str(SHIPPED_BUNDLE)
    graph = f"{bundle}/fp32/decoder_step.onnx"
    out = tmp_path / "profile.json"
    step_profile.main([bundle, "--rows", "2", "--past", "3", "--repeats", "5", "--graph", graph, "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["rows"] == 2 and report["past"] == 3 and len(report["graphs"]) == 2
    for entry in report["graphs"].values():
        profile = entry["profile"]
        assert entry["timing"]["median_ms"] > 0 and profile["runs"] >= 5
        assert abs(sum(r["us_per_step"] for r in profile["by_op"].values()) - profile["kernel_us_per_step"]) < 1e-6 * profile["kernel_us_per_step"] + 1e-6
    # onnxruntime fuses some nodes (Gelu with its bias), so compare an op it leaves alone
    nodes = collections.Counter(n.op_type for n in onnx.load(graph).graph.node)
    assert report["graphs"][graph]["profile"]["by_op"]["Attention"]["nodes"] == nodes["Attention"]



def test_the_step_split_counts_every_step_once_and_its_parts_fit_in_the_wall_time(tmp_path) -> None:
    """bench/step_split.py on the shipped bundle: every decoder step is seen by the run observer,
    two instances decode the same batches in the same number of steps as one, and the parts of a
    step (onnxruntime, glue, search, encoder, joining) are positive and add up to at most its wall
    time."""
    import json

    from attnserve.bench import step_split

    split = tmp_path / "split.tsv"
    split.write_text("".join(f"{text}\tx\n" for text in ["Open the file.", "Save the document before closing it.",
                                                         "Cancel", "The printer is not connected.", "Quit"]))
    reports = []
    for instances in (1, 2):
        out = tmp_path / f"split-{instances}.json"
        step_split.main([str(SHIPPED_BUNDLE), "--split", str(split), "--precision", "fp32", "--batch", "2",
                         "--instances", str(instances), "--json", str(out)])
        reports.append(json.loads(out.read_text()))
    one, two = reports
    assert one["sentences"] == two["sentences"] == 5 and one["steps"] == two["steps"] > 0
    for report in reports:
        parts = report["ms_per_step"]
        wall = parts.pop("wall_per_instance")
        assert all(ms > 0 for ms in parts.values()) and sum(parts.values()) <= wall * 1.001
        assert report["hardware"]["model"]


def test_the_shared_cross_attention_probe_decodes_what_the_bundle_decodes(tmp_path) -> None:
    """bench/shared_cross_attention.py on the shipped bundle: with its static inputs one row per
    sentence, the rewritten step graph picks the same candidates as the bundle's graph on the
    same state, to float rounding, and its static inputs are declared per sentence."""
    import json

    from attnserve.bench import shared_cross_attention as probe
    from attnserve.server.bundle import load_bundle

    split = tmp_path / "split.tsv"
    split.write_text("Open the file.\tx\nThe printer is not connected to this computer.\tx\nQuit\tx\n")
    out = tmp_path / "probe.json"
    probe.main([str(SHIPPED_BUNDLE), "--split", str(split), "--precision", "fp32", "--sentences", "3", "--source", "1", "256",
                "--beam", "2", "--past", "3", "--rounds", "1", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["rows"] == 6 and report["same_top_ids"]
    assert max(report["max_abs_difference"].values()) < 1e-4 and all(ms > 0 for ms in report["ms_per_step"].values())
    graph = probe.per_sentence_graph(load_bundle(SHIPPED_BUNDLE), "fp32")
    batch_axis = {v.name: v.type.tensor_type.shape.dim[0].dim_param for v in graph.graph.input}
    assert batch_axis["cross_k0"] == batch_axis["src_mask"] == "sentences" != batch_axis["self_k0"]

def test_bundle_eval_scores_the_engines_own_output_as_perfect(bundles, tmp_path) -> None:
    """bench/bundle_eval.py: references equal to what the engine writes score BLEU and chrF 100,
    and every sentence lands in one of `attnserve eval`'s length buckets; a wrong reference scores
    lower."""
    from attnserve.bench.bundle_eval import evaluate
    from attnserve.model.evaluate import bucket_of
    from attnserve.server.bundle import load_bundle
    from attnserve.server.engine import Engine, TranslationOptions

    sources = ["a b c d", "b c d e f g", "c d e f g h i j k l m n"]
    engine = Engine(load_bundle(bundles["transformer"]), "fp32", "cpu", 1)
    own = engine.translate_text(sources, TranslationOptions(beam_size=2))
    engine.close()
    split = tmp_path / "split.tsv"
    split.write_text("".join(f"{s}\t{t}\n" for s, t in zip(sources, own)), encoding="utf-8")
    result = evaluate(bundles["transformer"], split, beam=2)
    assert result["sentences"] == 3 and sum(bucket["sentences"] for bucket in result["buckets"].values()) == 3
    assert all(own) and result["bleu"] == 100.0 and result["chrf"] == 100.0
    split.write_text("".join(f"{s}\tzz yy xx ww\n" for s in sources), encoding="utf-8")
    assert evaluate(bundles["transformer"], split, beam=2)["chrf"] < 100.0
    assert [bucket_of(s) for s in ("one", " ".join(["w"] * 12), " ".join(["w"] * 31))] == ["1-5", "11-20", "31+"]


def test_scaling_sources_have_the_asked_length_and_the_state_is_counted_per_token() -> None:
    """bench/scaling.py: sources of exactly L ids ending in EOS, and the decoder state of the
    shipped Transformer per beam row: 6 cross-attention tensors of 4 heads x 64 fp32 values per
    source token (and the mask's byte), the same per generated token for the self-attention cache."""
    from attnserve.bench.scaling import sources_of_length, state_bytes
    from attnserve.server.bundle import load_bundle
    from attnserve.server.engine import Engine

    pool = [[5, 6, 7, 3], [8, 9, 3], [10, 11, 12, 13, 3]] * 10
    for length in (1, 5, 12):
        sources = sources_of_length(pool, length, 3, eos=3)
        assert all(len(s) == length and s[-1] == 3 and 3 not in s[:-1] for s in sources)
    engine = Engine(load_bundle(SHIPPED_BUNDLE), "fp32", "cpu", 1)
    assert state_bytes(engine) == {"per_source_token": 6 * 4 * 64 * 4 + 1, "per_target_step": 6 * 4 * 64 * 4 + 1,
                                   "static_per_sentence": 0}  # the shipped bundle predates sharing
    engine.close()


def test_the_load_loop_retries_refused_requests_and_counts_them() -> None:
    """bench/load.py: a request the server refuses for load is sent again (its latency counts
    from the first try), every sentence is answered exactly once, and the refusals are counted."""
    import asyncio

    from attnserve.bench.load import Refused, _closed_loop

    answered: list[str] = []
    refusals_left = {"s1": 2, "s4": 1}

    async def translate(sentence: str) -> None:
        await asyncio.sleep(0)
        if refusals_left.get(sentence, 0):
            refusals_left[sentence] -= 1
            raise Refused("Concurrent RPC limit exceeded!")
        answered.append(sentence)

    sentences = [f"s{i}" for i in range(6)]
    row = asyncio.run(_closed_loop(sentences, [translate, translate, translate]))
    assert sorted(answered) == sentences and row["refused"] == 3 and row["sentences"] == 6 and row["clients"] == 3


def test_the_load_benchmarks_offline_reference_is_the_engine_at_its_best(monkeypatch) -> None:
    """bench/load.py: the offline engine that the server is held against is searched over batch
    sizes (and step spinning on more than one thread); the reference is the fastest try, and
    its setting is named in the row."""
    from attnserve.bench import load
    from attnserve.server.config import SHIPPED_REPOSITORY

    monkeypatch.setattr(load, "OFFLINE_BATCHES", (2, 8))
    sentences = ["Open the file.", "Close the window.", "Save the document before closing the window.",
                 "Click the Cancel button to stop the download."] * 2
    row = load.run_offline(SHIPPED_REPOSITORY, "en-fr", 2, sentences, beam=2)
    tries = row["tries"]
    assert [(t["batch"], t["spin_step"]) for t in tries] == [(2, False), (8, False), (2, True), (8, True)]
    best = max(tries, key=lambda t: t["sentences_per_s"])
    assert row["sentences_per_s"] == best["sentences_per_s"]
    assert row["setting"] == {"batch": best["batch"], "spin_step": best["spin_step"]}
    assert f"batches of {best['batch']}" in row["mode"]
    assert [t["spin_step"] for t in load.run_offline(SHIPPED_REPOSITORY, "en-fr", 1, sentences, beam=2)["tries"]] == [False, False]
