"""`attnserve translate` for the formats that go through the text pipeline: gettext PO/POT,
XLIFF 1.2, HTML/XML files and documents (paragraphs), offline or with --server. Plain text (one
sentence a line) and JSONL stay with attnserve.server.batch.

The format comes from the extension (.po .pot .xlf .xliff .html .htm .xhtml .md) or --format;
the CLI calls `translate_file(args)` first and goes on with the line formats when it returns None.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

log = logging.getLogger("attnserve")

PIPELINE_FORMATS = ("po", "xliff", "html", "xml", "document")
FORMAT_CHOICES = ["auto", "text", "jsonl", *PIPELINE_FORMATS]


def add_file_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the pipeline formats (--format itself is declared by the CLI)."""
    parser.add_argument("--language", default="", help="po: target language (default: the catalog's Language header, "
                        "else the model's)")
    parser.add_argument("--no-fuzzy", dest="fuzzy", action="store_false",
                        help="po: do not mark written translations '#, fuzzy'")
    parser.add_argument("--overwrite", action="store_true",
                        help="po, xliff: translate entries (trans-units) that have a translation too")
    parser.add_argument("--xliff-state", default="needs-review-translation",
                        help="xliff: the state attribute of written targets ('' for none)")
    parser.add_argument("--chunk-chars", type=int, default=20_000,
                        help="document/html/xml: about this many characters translated and journaled together (resume unit)")
    parser.add_argument("--glossary", type=Path, help="TSV of source<TAB>target terms (empty target: do not translate), "
                        "on top of the model's glossary.tsv")
    parser.add_argument("--glossary-mode", choices=["constrained", "substitute"], default="constrained",
                        help="offline: glossary terms by constrained decoding, or masked and substituted "
                             "(with --server, the server's --glossary-mode)")


def _pipeline_format(args: argparse.Namespace) -> str | None:
    from attnserve.server.text.files import detect_format

    if len(args.input) != 1 or args.input == ["-"]:
        return None
    found = detect_format(Path(args.input[0]), args.format)
    return found if found in PIPELINE_FORMATS else None


def translate_file(args: argparse.Namespace) -> int | None:
    """Translate a PO/XLIFF/HTML/XML/document file; None when the input is for the line formats."""
    file_format = _pipeline_format(args)
    if file_format is None:
        return None
    from attnserve.server.text import Glossary, GlossaryError, TextFormat
    from attnserve.server.text.files import FileError, PoOptions, translate_po, translate_text_file
    from attnserve.server.text.xliff import XliffOptions, translate_xliff

    if not args.output:
        log.error("translating a %s file needs -o OUTPUT", file_format)
        return 2
    source, output = Path(args.input[0]), Path(args.output)
    try:
        glossary = Glossary.load(args.glossary) if args.glossary else None
        translate_items, model_language, close = (_remote(args, glossary) if args.server else _offline(args, glossary))
    except (GlossaryError, OSError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    try:
        if file_format == "po":
            summary = translate_po(source, output, translate_items,
                                   PoOptions(args.language, args.fuzzy, args.overwrite, args.chunk_lines), model_language)
        elif file_format == "xliff":
            summary = translate_xliff(source, output, translate_items,
                                      XliffOptions(args.xliff_state, args.overwrite, args.chunk_lines))
        else:
            text_format = {"html": TextFormat.HTML, "xml": TextFormat.XML, "document": TextFormat.DOCUMENT}[file_format]
            summary = translate_text_file(source, output, translate_items, text_format, args.chunk_chars)
    except (FileError, OSError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    except Exception as exc:  # a server error (grpc.RpcError) ends the run; the journal keeps what is done
        if type(exc).__module__.startswith("grpc"):
            log.error("server: %s", exc)
            return 1
        raise
    finally:
        close()
    print(summary.describe())
    return 0


def _offline(args: argparse.Namespace, glossary):
    from attnserve.server.bundle import load_bundle
    from attnserve.server.engine import Engine, TranslationOptions
    from attnserve.server.text import PipelineConfig, TextPipeline, engine_translator

    if not args.model:
        raise ValueError("offline translation needs --model BUNDLE (or use --server HOST:PORT)")
    # The only engine in the process: its step session's workers may spin between steps
    # (runtime.OnnxRuntime's spin_step), 1.2x at batch 32 on 2 threads (docs/performance.md).
    engine = Engine(load_bundle(args.model), args.precision, args.device, args.threads, spin_step=args.threads != 1)
    options = TranslationOptions(beam_size=args.beam, length_penalty=args.length_penalty)
    options.validate()
    pipeline = TextPipeline.for_engine(engine, PipelineConfig(glossary_mode=args.glossary_mode))
    translate = engine_translator(engine, options)

    def translate_items(items):
        for item in items:
            item.glossary = glossary
        return pipeline.translate(items, translate)

    return translate_items, _target(engine), lambda: None


def _target(engine) -> str:
    manifest = engine.bundle.manifest
    return manifest["languages"]["target"] if isinstance(manifest, dict) else manifest.languages.target


def _remote(args: argparse.Namespace, glossary):
    from attnserve.client import TranslatorClient

    token = args.token or os.environ.get("ATTNSERVE_AUTH_TOKEN") or None
    root = Path(args.tls_ca).read_bytes() if args.tls_ca else None
    client = TranslatorClient(args.server, token=token, tls=args.tls or bool(root), root_certificates=root,
                              timeout=args.timeout)
    if args.wait:
        client.wait_until_serving(args.wait)
    model = client.get_model(args.model_name or "")

    def translate_items(items):
        return client.translate_items(items, args.model_name or "", glossary=glossary, beam_size=args.beam,
                                      length_penalty=args.length_penalty)

    return translate_items, model.target_language, client.close
