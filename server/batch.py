"""Offline batch translation of a file: plain text (one sentence a line) or JSONL.

Every input line gives exactly one output line, in order, even across interruptions:
translations are appended to OUTPUT.partial chunk by chunk and fsynced; a rerun counts the
complete lines already there (dropping a torn last line), skips that many input lines and goes
on; the finished file is renamed to OUTPUT. `--shard I/N` processes the I-th of N contiguous
slices, so the shards' outputs concatenated in order are the output of the whole file.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from attnserve.decoding_rules import source_ids
from attnserve.server.engine import Engine, TranslationOptions

log = logging.getLogger(__name__)


class BatchError(Exception):
    """The batch job cannot run as asked (bad shard, missing input, finished output exists)."""


@dataclasses.dataclass
class BatchSummary:
    lines: int = 0  # input lines this run handled
    resumed_from: int = 0  # lines already done by an earlier, interrupted run
    translated: int = 0
    empty: int = 0
    truncated: int = 0
    refused: int = 0  # over-long lines reported instead of translated, and malformed JSONL
    source_tokens: int = 0
    target_tokens: int = 0
    seconds: float = 0.0

    def describe(self) -> str:
        rate = self.translated / self.seconds if self.seconds else 0.0
        tokens = self.target_tokens / self.seconds if self.seconds else 0.0
        return (f"{self.lines} lines ({self.resumed_from} done before), {self.translated} translated, "
                f"{self.empty} empty, {self.truncated} truncated, {self.refused} refused; "
                f"{rate:.1f} sentences/s, {tokens:.0f} target tokens/s")


def parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError as exc:
        raise BatchError(f"--shard must look like I/N, got {text!r}") from exc
    if count < 1 or not 0 <= index < count:
        raise BatchError(f"--shard {text}: need 0 <= I < N")
    return index, count


def shard_range(total: int, index: int, count: int) -> tuple[int, int]:
    """Contiguous slice [start, end) of total lines for shard index of count."""
    return total * index // count, total * (index + 1) // count


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b"")) + _has_unterminated_line(path)


def _has_unterminated_line(path: Path) -> int:
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb") as f:
        f.seek(size - 1)
        return int(f.read(1) != b"\n")


def _recover_partial(partial: Path) -> int:
    """Number of complete lines in an earlier run's output; a torn last line is cut off."""
    if not partial.exists():
        return 0
    data = partial.read_bytes()
    complete = data.rfind(b"\n") + 1
    if complete != len(data):
        with open(partial, "r+b") as f:
            f.truncate(complete)
    return data.count(b"\n", 0, complete)


def _read_lines(path: Path, start: int, end: int) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace", newline="\n") as f:
        for line in itertools.islice(f, start, end):
            yield line.rstrip("\n").rstrip("\r")


class BatchTranslator:
    def __init__(self, engine: Engine, options: TranslationOptions, jsonl: bool = False,
                 long_lines: str = "truncate", chunk_lines: int = 512):
        if long_lines not in ("truncate", "report"):
            raise BatchError(f"--long must be truncate or report, got {long_lines!r}")
        self.engine, self.options, self.jsonl = engine, options, jsonl
        self.long_lines, self.chunk_lines = long_lines, chunk_lines
        self.max_source_tokens = engine.max_source_tokens

    def _translate_chunk(self, lines: list[str], summary: BatchSummary) -> list[str]:
        """Output lines for input lines: translations, empty lines, or reported refusals."""
        records: list[dict | None] = []
        texts: list[str | None] = []
        outputs: list[str | None] = [None] * len(lines)
        for i, line in enumerate(lines):
            record = None
            if self.jsonl and line.strip():
                try:
                    record = json.loads(line)
                    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                        raise ValueError('each JSONL line needs an object with a string "text"')
                except ValueError as exc:
                    outputs[i] = json.dumps({"error": f"malformed input line: {exc}"}, ensure_ascii=False)
                    summary.refused += 1
                    records.append(None)
                    texts.append(None)
                    continue
            text = record["text"] if record is not None else line
            records.append(record)
            texts.append(text if text.strip() else None)
            if not text.strip():
                summary.empty += 1
                outputs[i] = json.dumps({**record, "translation": ""}, ensure_ascii=False) if record is not None else ""

        todo = [i for i, t in enumerate(texts) if t is not None and outputs[i] is None]
        encoded = self.engine.tokenizer.encode([texts[i] for i in todo])
        sources, keep = [], []
        for i, ids in zip(todo, encoded):
            if len(ids) > self.max_source_tokens:
                if self.long_lines == "report":
                    message = f"source has {len(ids)} tokens, more than the model's {self.max_source_tokens}"
                    outputs[i] = (json.dumps({**records[i], "error": message}, ensure_ascii=False)
                                  if records[i] is not None else "")
                    log.warning("line not translated: %s", message)
                    summary.refused += 1
                    continue
                summary.truncated += 1
            sources.append(source_ids(ids, self.engine.max_len, self.engine.eos))  # cut to max_source_tokens
            keep.append(i)
        results = self.engine.translate_ids(sources, self.options)
        translations = self.engine.tokenizer.decode([hyps[0].tokens for hyps in results])
        for i, src, hyps, text in zip(keep, sources, results, translations):
            summary.translated += 1
            summary.source_tokens += len(src)
            summary.target_tokens += len(hyps[0].tokens) + 1
            if records[i] is not None:
                outputs[i] = json.dumps({**records[i], "translation": text}, ensure_ascii=False)
            else:
                outputs[i] = text.replace("\n", " ")
        return [o if o is not None else "" for o in outputs]

    def run(self, input_path: Path, output_path: Path, shard: tuple[int, int] = (0, 1), progress: bool = True) -> BatchSummary:
        if not input_path.is_file():
            raise BatchError(f"input file not found: {input_path}")
        if output_path.exists():
            raise BatchError(f"{output_path} exists and is complete; remove it to translate again")
        partial = output_path.with_name(output_path.name + ".partial")
        start, end = shard_range(_count_lines(input_path), *shard)
        done = _recover_partial(partial)
        if done > end - start:
            raise BatchError(f"{partial} has {done} lines but this shard has only {end - start}: "
                             "it belongs to another input or shard; remove it")
        summary = BatchSummary(lines=end - start, resumed_from=done)
        if done:
            log.info("resuming %s: %d of %d lines already translated", output_path, done, end - start)
        began = time.perf_counter()
        lines = _read_lines(input_path, start + done, end)
        bar = tqdm(total=end - start, initial=done, unit="line", disable=not progress, dynamic_ncols=True)
        with open(partial, "a", encoding="utf-8", newline="\n") as out:
            while chunk := list(itertools.islice(lines, self.chunk_lines)):
                out.write("".join(line + "\n" for line in self._translate_chunk(chunk, summary)))
                out.flush()
                os.fsync(out.fileno())  # a chunk is on disk before the next one starts
                bar.update(len(chunk))
        bar.close()
        partial.replace(output_path)
        summary.seconds = time.perf_counter() - began
        log.info("%s: %s", output_path, summary.describe())
        return summary
