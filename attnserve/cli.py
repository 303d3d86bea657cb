"""The `attnserve` command. Subcommands import their implementation lazily, so the serving
subcommands never import torch or the training code."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the subcommands import their implementation lazily
    from attnserve.model.reserved import ReservedList

log = logging.getLogger("attnserve")


def _data_build(args: argparse.Namespace) -> int:
    from attnserve.model.corpus import DEFAULT_OOD, CleanConfig, CorpusError, OodSplit, build_corpus

    cfg = CleanConfig(max_chars=args.max_chars, max_words=args.max_words, max_ratio=args.max_ratio,
                      dev_fraction=args.dev_fraction, test_fraction=args.test_fraction)
    locale_dir = None if args.no_catalogs else Path(args.locale_dir)
    # The held-out packages come from a harvest: without a cache there is nothing to hold out.
    if args.no_ood or not args.cache:
        ood = OodSplit()
    else:
        ood = OodSplit(tuple(args.ood_dev if args.ood_dev is not None else DEFAULT_OOD.dev_packages),
                       tuple(args.ood_test if args.ood_test is not None else DEFAULT_OOD.test_packages))
    try:
        reserved = _reserved_list(args)
        report = build_corpus(Path(args.out), args.src, args.tgt, locale_dir, args.tsv, args.moses, cfg,
                              cache_dirs=args.cache, help_dirs=args.help_dir, reserved=reserved, ood=ood)
    except (CorpusError, ValueError, OSError) as exc:
        log.error("%s", exc)
        return 2
    summary = {k: getattr(report, k) for k in ("read", "kept", "splits", "dropped", "catalogs", "corrupt_catalogs",
                                               "packages", "read_by_source", "help_pages", "reserved")}
    print(json.dumps(summary, indent=2))
    return 0


def _data_harvest(args: argparse.Namespace) -> int:
    from attnserve.model.harvest import (AptGetFetcher, DirectoryFetcher, HarvestError, HarvestOptions, harvest,
                                         local_package_info)

    try:
        reserved = _reserved_list(args)
    except (ValueError, OSError) as exc:
        log.error("%s", exc)
        return 2
    options = HarvestOptions(src=args.src, tgt=args.tgt, cache=Path(args.cache), reserved=reserved,
                             max_deb_mb=args.max_deb_mb, jobs=args.jobs, refresh_index=args.refresh_index,
                             contents=args.contents or None, progress=not args.quiet)
    if args.deb_dir:  # offline: a local directory of .debs stands in for apt
        fetch, info = DirectoryFetcher(args.deb_dir), (lambda names: local_package_info(args.deb_dir))
    else:
        fetch, info = AptGetFetcher(tuple(args.fetch_command.split())), None
    try:
        report = harvest(options, fetch, info)
    except HarvestError as exc:
        log.error("%s", exc)
        return 2
    print(json.dumps(report.summary(), indent=2))
    return 0 if report.harvested else 1


def _data_vision(args: argparse.Namespace) -> int:
    from attnserve.model.vision.data import GeneratorConfig, build_dataset, sample_grid

    cfg = GeneratorConfig(height=args.height, width=args.width, font_dir=args.fonts or "")
    meta = build_dataset(Path(args.out), args.seed, {"train": args.train, "dev": args.dev, "test": args.test}, cfg)
    if args.grid:
        sample_grid(args.seed, "test", 48, Path(args.grid), cfg=cfg, show_boxes=args.grid_boxes)
        print(f"sample grid: {args.grid}")
    print(json.dumps({k: meta[k] for k in ("seed", "counts")}, indent=2))
    return 0


def _data_fonts(args: argparse.Namespace) -> int:
    from attnserve.model.vision.fonts import fetch_fonts, fonts_in

    report = fetch_fonts(Path(args.cache))
    report["usable_font_files"] = len(fonts_in(args.cache))
    print(json.dumps(report, indent=2))
    return 0 if report["fetched"] or report["cached"] else 1


def _reserved_list(args: argparse.Namespace) -> ReservedList:
    """The reserved-for-evaluation list: the default path may be absent (a checkout elsewhere),
    an explicit one must exist."""
    from attnserve.model.reserved import ReservedList, default_reserved_list

    if args.no_reserved:
        log.warning("no reserved list: reserved evaluation packages may be read")
        return ReservedList()
    path = Path(args.reserved) if args.reserved else default_reserved_list()
    if not path.is_file() and not args.reserved:
        log.warning("reserved list %s not found: nothing is excluded (pass --reserved PATH)", path)
        return ReservedList()
    reserved = ReservedList.load(path)
    log.info("reserved list %s: %d packages, %d catalogs excluded", path, len(reserved.packages), len(reserved.catalogs))
    return reserved


def _train(args: argparse.Namespace) -> int:
    from attnserve.model.config import Config
    from attnserve.model.train import run_training

    config = Config.load(args.config)
    if args.time_limit is not None:
        config.train.time_limit_min = args.time_limit
    if args.max_steps is not None:
        config.train.max_steps = args.max_steps
    if args.threads is not None:
        config.train.threads = args.threads
    if args.data:
        config.train.data_dir = args.data
    if args.out:
        config.train.out_dir = args.out
    run_training(config, resume=not args.no_resume)
    return 0


def _average(args: argparse.Namespace) -> int:
    from attnserve.model.checkpoint import CheckpointError, average_checkpoints

    try:
        out = average_checkpoints(args.sources, args.out, args.checkpoint, args.dtype)
    except CheckpointError as exc:
        log.error("%s", exc)
        return 2
    log.info("averaged %d checkpoints into %s", len(args.sources), out)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from attnserve.model.checkpoint import CheckpointError, read_config
    from attnserve.model.decode import DecodeOptions
    from attnserve.model.evaluate import default_device, evaluate_run, plot_buckets

    opts = DecodeOptions(beam_size=args.beam, length_penalty=args.length_penalty)
    device = args.device or default_device()
    if (readers := _reader_runs(args.runs)) is not None:
        return _eval_readers(args, readers, device)
    results = []
    try:
        for run in args.runs:
            split = Path(args.split) if args.split else Path(read_config(Path(run)).train.data_dir) / "test.tsv"
            results.append(evaluate_run(Path(run), split, opts, args.checkpoint, device))
    except CheckpointError as exc:
        log.error("%s", exc)
        return 2
    for r in results:
        buckets = "  ".join(f"{k}: {v['bleu']:.1f}" for k, v in r["buckets"].items())
        print(f"{r['model']:40s} params {r['parameters']:>11,}  BLEU {r['bleu']:5.2f}  chrF {r['chrf']:5.2f}  | {buckets}")
    plot = Path(args.plot) if args.plot else Path(args.runs[0]) / "bleu-by-length.png"
    plot_buckets(results, plot)
    print(f"plot: {plot}")
    if args.show:
        from attnserve.model.checkpoint import load_model
        from attnserve.model.corpus import load_tsv
        from attnserve.model.evaluate import translate_best

        model, tokenizer, config = load_model(Path(args.runs[0]), args.checkpoint, device)
        rows = load_tsv(Path(config.train.data_dir) / "test.tsv")[: args.show]
        for (src, ref), hyp in zip(rows, translate_best(model, tokenizer, [s for s, _ in rows], opts)):
            print(f"\nsource:    {src}\nreference: {ref}\nmodel:     {hyp}")
    return 0


def _reader_runs(runs: list[str]) -> list[Path] | None:
    """The runs, if they are image readers (model.arch = "reader"); None for translation runs."""
    from attnserve.model.checkpoint import CheckpointError, read_config

    try:
        arches = {read_config(Path(run)).model.arch for run in runs}
    except (CheckpointError, ValueError):  # unreadable, or a config of an unknown architecture
        return None  # the translation path reports it
    return [Path(run) for run in runs] if arches == {"reader"} else None


def _eval_readers(args: argparse.Namespace, runs: list[Path], device: str) -> int:
    from attnserve.model.checkpoint import CheckpointError, read_config
    from attnserve.model.vision.evaluate import evaluate_reader

    try:
        for run in runs:
            split = Path(args.split) if args.split else Path(read_config(run).train.data_dir) / "test.npz"
            r = evaluate_reader(run, split, args.checkpoint, device, overlays=args.show or 8)
            lengths = "  ".join(f"{k}: {v['accuracy']:.1f}" for k, v in r["by_length"].items())
            peak = (f"  peak-in-box {r['peak_in_box']:.1f}% (columns {r['peak_in_columns']:.1f}%)"
                    if "peak_in_box" in r else "")
            print(f"{r['model']:24s} params {r['parameters']:>9,}  sequence {r['accuracy']:5.2f}%  digit "
                  f"{r['digit_accuracy']:5.2f}%{peak}  | by length {lengths}")
    except (CheckpointError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 2
    return 0


def _export(args: argparse.Namespace) -> int:
    from attnserve.server.bundle import BundleError, load_bundle

    if args.summary_only:
        from attnserve.export.exporter import summary

        try:
            print(summary(load_bundle(args.source).manifest))
        except BundleError as exc:
            log.error("%s", exc)
            return 2
        return 0
    if not args.out:
        log.error("--out REPO/NAME/VERSION is required to export")
        return 2
    if _reader_runs([args.source]) is not None:  # an image reader: its own graphs and manifest
        from attnserve.export.reader import ReaderExportError, export_reader

        try:
            manifest = export_reader(Path(args.source), Path(args.out), args.checkpoint, args.validation_sentences or 512)
        except (ReaderExportError, FileExistsError, FileNotFoundError) as exc:
            log.error("%s", exc)
            return 2
        print(json.dumps({"model": manifest["model"], "validation": manifest["validation"]}, indent=2))
        return 0
    from attnserve.export.exporter import export_bundle, summary
    from attnserve.export.specs import UnsupportedArchitecture
    from attnserve.export.validate import ExportValidationError
    from attnserve.model.checkpoint import CheckpointError

    try:
        manifest = export_bundle(Path(args.source), Path(args.out), tuple(args.precision), args.checkpoint,
                                 args.validation_sentences)
    except (CheckpointError, ExportValidationError, UnsupportedArchitecture, FileExistsError, ValueError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 2
    print(summary(manifest))
    return 0


def _translate(args: argparse.Namespace) -> int:
    from attnserve.translate_files import translate_file  # PO, HTML, documents: the text pipeline

    if (handled := translate_file(args)) is not None:
        return handled
    if args.server:
        return _translate_remote(args)
    if len(args.input) != 1 or not args.output or not args.model:
        log.error("offline translation takes one INPUT file, -o OUTPUT and --model BUNDLE (or use --server HOST:PORT)")
        return 2
    args.input = args.input[0]
    from attnserve.server.batch import BatchError, BatchTranslator, parse_shard
    from attnserve.server.bundle import BundleError, load_bundle
    from attnserve.server.engine import Engine, TranslationOptions

    try:
        shard = parse_shard(args.shard)
        engine = Engine(load_bundle(args.model), args.precision, args.device, args.threads)
        options = TranslationOptions(beam_size=args.beam, length_penalty=args.length_penalty)
        options.validate()
        jsonl = args.format == "jsonl" or (args.format == "auto" and Path(args.input).suffix == ".jsonl")
        translator = BatchTranslator(engine, options, jsonl, args.long, args.chunk_lines)
        summary = translator.run(Path(args.input), Path(args.output), shard, progress=not args.quiet)
    except (BatchError, BundleError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    print(summary.describe())
    return 0


def _translate_remote(args: argparse.Namespace) -> int:
    import grpc

    from attnserve.client import TranslatorClient

    texts = [line.rstrip("\n") for line in sys.stdin] if args.input in ([], ["-"]) else args.input
    token = args.token or os.environ.get("ATTNSERVE_AUTH_TOKEN") or None
    root = Path(args.tls_ca).read_bytes() if args.tls_ca else None
    try:
        with TranslatorClient(args.server, token=token, tls=args.tls or bool(root), root_certificates=root,
                              timeout=args.timeout) as client:
            if args.wait:
                client.wait_until_serving(args.wait)
            response = client.translate(texts, args.model_name or "", beam_size=args.beam, length_penalty=args.length_penalty)
    except (grpc.RpcError, grpc.FutureTimeoutError, TimeoutError) as exc:
        if not isinstance(exc, grpc.RpcError):
            log.error("no server SERVING at %s after %.0f s", args.server, args.wait)
            return 1
        log.error("%s: %s", exc.code().name, exc.details())
        return 1
    for translation in response.translations:
        print(translation.hypotheses[0].text)
    return 0


def _read(args: argparse.Namespace) -> int:
    """`attnserve read IMAGE...`: one line per image, its path, a tab, the digits read; a bad
    image is reported and the others are still read (exit status 1)."""
    if args.server:
        return _read_remote(args)
    from attnserve.server.reader import ImageError, OrtReader, ReaderBundleError, overlay_strip

    model = Path(args.model) if args.model else Path(__file__).resolve().parent.parent / "models/repository/house-numbers/1"
    try:
        reader = OrtReader(model, threads=args.threads)
    except (ReaderBundleError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 2
    status = 0
    for path in args.images:
        try:
            data = Path(path).read_bytes()
            reading = reader.read_images([data])[0]
        except (ImageError, OSError) as exc:
            log.error("%s: %s", path, str(exc).removeprefix("image 0: "))
            status = 1
            continue
        print(f"{path}\t{reading.text}" + (f"\t{reading.score:.3f}" if args.scores else ""))
        if args.overlays:
            out = Path(args.overlays) / f"{Path(path).name}.attention.png"  # door.png and door.jpg: two files
            out.parent.mkdir(parents=True, exist_ok=True)
            overlay_strip(reader.decode(data), reading, reader.grid).save(out)
    return status


def _read_remote(args: argparse.Namespace) -> int:
    import grpc

    from attnserve.v1 import reader_pb2, reader_pb2_grpc

    token = args.token or os.environ.get("ATTNSERVE_AUTH_TOKEN") or None
    metadata = [("authorization", f"Bearer {token}")] if token else None
    status = 0
    with grpc.insecure_channel(args.server) as channel:
        stub = reader_pb2_grpc.ReaderStub(channel)
        for path in args.images:  # one request per image, so that a bad one fails alone
            try:
                response = stub.Read(reader_pb2.ReadRequest(images=[Path(path).read_bytes()], model=args.model_name or ""),
                                     timeout=args.timeout, metadata=metadata)
            except OSError as exc:
                log.error("%s: %s", path, exc)
                status = 1
                continue
            except grpc.RpcError as exc:
                log.error("%s: %s: %s", path, exc.code().name, exc.details())
                if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                    return 1
                status = 1
                continue
            reading = response.readings[0]
            print(f"{path}\t{reading.text}" + (f"\t{reading.score:.3f}" if args.scores else ""))
    return status


def _serve(args: argparse.Namespace) -> int:
    from attnserve.server.config import load_config
    from attnserve.server.service import serve

    try:
        config = load_config(args)
    except (ValueError, OSError) as exc:
        log.error("%s", exc)
        return 2
    logging.getLogger().setLevel(config.log_level)
    return serve(config)


def add_data_build_parser(subparsers: argparse._SubParsersAction) -> None:
    """`data build`: read catalogs, a harvest cache, help pages, TSV and Moses files; clean; split."""
    parser = subparsers.add_parser("build", help="read gettext catalogs, a harvest cache, help pages, TSV / Moses files; clean, split")
    parser.add_argument("--src", default="en", help="source language (default en)")
    parser.add_argument("--tgt", default="fr", help="target language (default fr)")
    parser.add_argument("--out", required=True, help="output directory for train/dev/test.tsv and report.json")
    parser.add_argument("--locale-dir", default="/usr/share/locale", help="gettext locale directory")
    parser.add_argument("--no-catalogs", action="store_true", help="read only --tsv/--moses inputs")
    parser.add_argument("--tsv", type=Path, action="append", default=[], help="source<TAB>target file (repeatable)")
    parser.add_argument("--moses", type=Path, action="append", default=[],
                        help="Moses file prefix: PREFIX.SRC and PREFIX.TGT (repeatable)")
    parser.add_argument("--max-chars", type=int, default=300)
    parser.add_argument("--max-words", type=int, default=60)
    parser.add_argument("--max-ratio", type=float, default=3.0)
    parser.add_argument("--dev-fraction", type=float, default=0.02)
    parser.add_argument("--test-fraction", type=float, default=0.02)
    parser.add_argument("--cache", type=Path, action="append", default=[],
                        help="harvest cache (data harvest --cache) read like a locale directory (repeatable)")
    parser.add_argument("--help-dir", type=Path, action="append", default=[],
                        help="GNOME help directory (e.g. /usr/share/help) read besides the cache's (repeatable)")
    parser.add_argument("--reserved", help="reserved-for-evaluation list (default ../shared/heldout-packages.txt)")
    parser.add_argument("--no-reserved", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ood-dev", nargs="*", metavar="PACKAGE",
                        help="harvested packages held out as ood-dev.tsv (default: a fixed diverse set)")
    parser.add_argument("--ood-test", nargs="*", metavar="PACKAGE",
                        help="harvested packages held out as ood-test.tsv (default: a fixed diverse set)")
    parser.add_argument("--no-ood", action="store_true", help="no out-of-domain split")
    parser.set_defaults(func=_data_build)


def add_data_harvest_parser(subparsers: argparse._SubParsersAction) -> None:
    """`data harvest`: fetch Debian packages' translations into a cache."""
    parser = subparsers.add_parser("harvest", help="download Debian packages' translations (gettext, help pages) into a cache")
    parser.add_argument("--src", default="en", help="source language (default en)")
    parser.add_argument("--tgt", nargs="+", default=["fr"], help="target languages, harvested in one pass (default fr)")
    parser.add_argument("--cache", required=True, help="cache directory (resumable: done packages are skipped)")
    parser.add_argument("--max-deb-mb", type=float, default=50.0, help="skip (and report) packages larger than this")
    parser.add_argument("--jobs", type=int, default=4, help="parallel downloads")
    parser.add_argument("--reserved", help="reserved-for-evaluation list (default ../shared/heldout-packages.txt)")
    parser.add_argument("--no-reserved", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--contents", type=Path, action="append", default=[],
                        help="local Contents-*.gz index (default: the mirror's, from apt's sources, or apt-file)")
    parser.add_argument("--refresh-index", action="store_true", help="download the Contents index again")
    parser.add_argument("--deb-dir", type=Path, help="take NAME_VERSION_ARCH.deb files from this directory, not apt")
    parser.add_argument("--fetch-command", default="apt-get download -q", help="download command (gets NAME=VERSION)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=_data_harvest)


def add_data_vision_parser(subparsers: argparse._SubParsersAction) -> None:
    """`data vision`: generated house-number crops for the image reader."""
    parser = subparsers.add_parser("vision", help="generate house-number crops (train/dev/test.npz) for the image reader")
    parser.add_argument("--out", required=True, help="output directory, e.g. data/vision/house-numbers")
    parser.add_argument("--seed", type=int, default=1, help="every image is a function of (seed, split, index)")
    parser.add_argument("--train", type=int, default=50000)
    parser.add_argument("--dev", type=int, default=1000)
    parser.add_argument("--test", type=int, default=5000)
    parser.add_argument("--height", type=int, default=32)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--fonts", help="also draw with the font files under this directory (attnserve data fonts)")
    parser.add_argument("--grid", help="also write a PNG grid of test samples here")
    parser.add_argument("--grid-boxes", action="store_true", help="draw the digit boxes on the grid")
    parser.set_defaults(func=_data_vision)


def add_data_parser(subparsers: argparse._SubParsersAction) -> None:
    """`data`: corpus subcommands (build, harvest, vision)."""
    data = subparsers.add_parser("data", help="build a parallel corpus").add_subparsers(dest="action", required=True)
    add_data_build_parser(data)
    add_data_harvest_parser(data)
    add_data_vision_parser(data)
    fonts = data.add_parser("fonts", help="fetch Debian's font packages (apt-get download, never installed) for data vision")
    fonts.add_argument("--cache", required=True, help="font directory, e.g. data/fonts")
    fonts.set_defaults(func=_data_fonts)


def add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    """`train`: train or resume a model from a TOML config."""
    parser = subparsers.add_parser("train", help="train or resume a model")
    parser.add_argument("--config", required=True, help="TOML config with [model] and [train] tables")
    parser.add_argument("--time-limit", type=float, help="minutes of training before a clean stop")
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: all cores)")
    parser.add_argument("--data", help="override train.data_dir")
    parser.add_argument("--out", help="override train.out_dir (the run directory)")
    parser.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    parser.set_defaults(func=_train)


def add_average_parser(subparsers: argparse._SubParsersAction) -> None:
    """`average`: checkpoints of one lineage averaged into a new run directory."""
    parser = subparsers.add_parser("average", help="average the weights of checkpoints of one model (run directories "
                                   "or weights files) into a new run directory")
    parser.add_argument("sources", nargs="+", help="run directories or model.safetensors files; the first run "
                        "directory gives the config and tokenizer")
    parser.add_argument("--out", required=True, help="the new run directory (its best checkpoint is the mean)")
    parser.add_argument("--checkpoint", default="best", choices=["best", "last"], help="which checkpoint of each run")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                        help="storage precision of the averaged weights (bf16: half the bytes, for a checkpoint kept in git)")
    parser.set_defaults(func=_average)


def add_eval_parser(subparsers: argparse._SubParsersAction) -> None:
    """`eval`: BLEU/chrF of runs, by length, with a plot."""
    parser = subparsers.add_parser("eval", help="BLEU/chrF on the test split, BLEU by source length, plot "
                                   "(image readers: accuracy, by length, peak-in-box, attention overlays)")
    parser.add_argument("runs", nargs="+", help="run directories (several: one plot compares them)")
    parser.add_argument("--split", help="TSV to score (default: the run's test.tsv; readers: test.npz)")
    parser.add_argument("--beam", type=int, default=1)
    parser.add_argument("--length-penalty", type=float, default=1.0)
    parser.add_argument("--checkpoint", default="best", choices=["best", "last"])
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--plot", help="PNG path (default RUN/bleu-by-length.png)")
    parser.add_argument("--show", type=int, default=0, help="print this many test translations "
                        "(readers: overlay this many test images, default 8)")
    parser.set_defaults(func=_eval)


def add_export_parser(subparsers: argparse._SubParsersAction) -> None:
    """`export`: a training run to a verified ONNX model bundle."""
    parser = subparsers.add_parser("export", help="export a training run to a verified ONNX model bundle")
    parser.add_argument("source", help="training run directory (or, with --summary, a bundle directory)")
    parser.add_argument("--out", help="bundle directory, conventionally REPO/NAME/VERSION")
    parser.add_argument("--precision", nargs="+", default=["fp32", "int8"], choices=["fp32", "int8", "fp16"],
                        help="precisions to export (fp16 needs CUDA for validation)")
    parser.add_argument("--checkpoint", default="best", choices=["best", "last"])
    parser.add_argument("--validation-sentences", type=int, default=0,
                        help="dev/test sentences used to validate (default: the whole splits)")
    parser.add_argument("--summary", dest="summary_only", action="store_true",
                        help="print node types and validation results of an existing bundle")
    parser.set_defaults(func=_export)


def add_translate_parser(subparsers: argparse._SubParsersAction) -> None:
    """`translate`: offline file translation, or sentences sent to a server."""
    from attnserve.translate_files import FORMAT_CHOICES, add_file_arguments  # argparse only

    parser = subparsers.add_parser("translate", help="translate a file offline (resumable, shardable)")
    parser.add_argument("input", nargs="*", help="offline: plain text (one sentence a line) or JSONL ({\"text\": ...} a line); "
                        "with --server: the sentences to translate (none or '-': stdin lines)")
    parser.add_argument("-o", "--output", help="output file; OUTPUT.partial while running (offline)")
    parser.add_argument("--model", help="model bundle directory (REPO/NAME/VERSION) (offline)")
    parser.add_argument("--server", help="HOST:PORT of an attnserve server: translate there and print the results")
    parser.add_argument("--model-name", help="with --server: model name (default: the server's default model)")
    parser.add_argument("--token", help="with --server: bearer token (default: env ATTNSERVE_AUTH_TOKEN)")
    parser.add_argument("--tls", action="store_true", help="with --server: connect with TLS (system roots)")
    parser.add_argument("--tls-ca", help="with --server: PEM root certificate to trust (implies --tls)")
    parser.add_argument("--timeout", type=float, default=30.0, help="with --server: deadline in seconds")
    parser.add_argument("--wait", type=float, default=0.0, help="with --server: first wait up to this many seconds for the "
                        "server to be SERVING (e.g. just after starting it)")
    parser.add_argument("--precision", default="fp32", help="fp32, int8 (CPU) or fp16 (CUDA), as the bundle has them")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: all cores)")
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--length-penalty", type=float, default=1.0)
    parser.add_argument("--shard", default="0/1", help="I/N: translate the I-th of N contiguous slices")
    parser.add_argument("--format", default="auto", choices=FORMAT_CHOICES,
                        help="auto: from the extension (.jsonl, .po/.pot, .html/.htm, .xlf, .md; else text); text: one "
                        "sentence a line; document: paragraphs split into sentences")
    add_file_arguments(parser)
    parser.add_argument("--long", default="truncate", choices=["truncate", "report"],
                        help="over-long lines: translate the truncated source, or report them and leave the line empty")
    parser.add_argument("--chunk-lines", type=int, default=512, help="lines translated and fsynced together")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=_translate)


def add_read_parser(subparsers: argparse._SubParsersAction) -> None:
    """`read`: house numbers in images, with the image reader."""
    parser = subparsers.add_parser("read", help="read the house number in images (PNG, JPEG) with an image reader bundle")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--model", help="reader bundle directory (default: the shipped models/repository/house-numbers/1)")
    parser.add_argument("--server", help="HOST:PORT of an attnserve server: read there (the Reader service)")
    parser.add_argument("--model-name", help="with --server: reader name (default: the server's, house-numbers)")
    parser.add_argument("--token", help="with --server: bearer token (default: env ATTNSERVE_AUTH_TOKEN)")
    parser.add_argument("--timeout", type=float, default=30.0, help="with --server: deadline in seconds")
    parser.add_argument("--threads", type=int, default=1, help="offline: onnxruntime intra-op threads")
    parser.add_argument("--scores", action="store_true", help="also print the reading's log-probability")
    parser.add_argument("--overlays", help="offline: write DIR/<image file name>.attention.png, one attention map per symbol")
    parser.set_defaults(func=_read)


def add_serve_parser(subparsers: argparse._SubParsersAction) -> None:
    """`serve`: the gRPC server; its flags are owned by attnserve.server.config."""
    from attnserve.server.config import add_arguments  # no torch, no onnxruntime: argparse only

    parser = subparsers.add_parser(
        "serve", help="serve the model repository over gRPC, and HTTP/JSON with --http-port (with no arguments: the shipped en-fr model)",
        description="Every setting can come from a flag, an environment variable or a TOML "
                    "file (--config), in that order of precedence.")
    add_arguments(parser)
    parser.set_defaults(func=_serve)


def add_bench_parser(subparsers: argparse._SubParsersAction) -> None:
    """`bench` and `bench-load` have their own parsers (main() hands them argv): listed for --help only."""
    subparsers.add_parser("bench", help="side-by-side decoding benchmark (torch, onnxruntime, CTranslate2); "
                          "see bench --help", add_help=False)
    subparsers.add_parser("bench-load", help="load benchmark (gRPC, or HTTP with --transports): concurrent clients, "
                          "batching on/off, vs the offline engine; see bench-load --help", add_help=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnserve", description="Attention-based machine translation.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_data_parser(subparsers)
    add_train_parser(subparsers)
    add_average_parser(subparsers)
    add_eval_parser(subparsers)
    add_export_parser(subparsers)
    add_translate_parser(subparsers)
    add_read_parser(subparsers)
    add_serve_parser(subparsers)
    add_bench_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # the benchmark has its own parser (it re-invokes itself per run)
        from attnserve.bench.benchmark import main as bench_main

        return bench_main(argv[1:])
    if argv[:1] == ["bench-load"]:
        from attnserve.bench.load import main as load_main

        return load_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
