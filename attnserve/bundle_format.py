"""The model bundle format: the contract between export (which writes bundles) and serving (which
reads them), as frozen records with `to_json` / `from_json`.

    REPO/NAME/VERSION/
      manifest.json            Manifest.to_json(), every other file named with its sha256
      spm.model                the SentencePiece model
      <precision>/encoder.onnx       SOURCE_IDS (batch, src_len) -> the StepSignature's encoder outputs
      <precision>/decoder_step.onnx  STEP_INPUTS -> SEARCH_OUTPUTS (see StepSignature)

The image reader's bundle (attnserve-reader, export/reader.py -> server/reader.py) has its own
records after the translator's (ReaderManifest), read and written by the same conversion.

Everything both sides must agree on is named here once: the format version, the graphs' input
and output names, the axis names, the decoder state (StepSignature) and the manifest's records.
The ONNX input/output strings are part of the format (every bundle written so far, the shipped
models/repository/en-fr/1 included, uses them), so they stay as they are; the Python constants
say what they mean.

Format version 1 is the layout of every bundle written so far; these records describe exactly
that layout (`from_json(m).to_json() == m` for every manifest the exporter writes), so reading a
version-1 manifest needs no migration. A manifest of another format or version is refused with
an error naming both versions. Pure Python: no torch, numpy or onnxruntime.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from attnserve.decoding_rules import LengthLimit, SpecialIds

FORMAT = "attnserve-bundle"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"

# -- graph names ---------------------------------------------------------------------------------
ENCODER_GRAPH = "encoder"  # file stem of the encoder graph
STEP_GRAPH = "decoder_step"  # file stem of the decoder-step graph

# Axis names of the graphs' symbolic dimensions.
BATCH_AXIS = "batch"  # rows: sentences (times beams)
# One row per sentence, for static state the step graph shares between a sentence's rows: those
# rows are consecutive and every sentence has as many (batch = sentences x K, K found from the
# shapes; K = 1, one row per sentence, is the layout of bundles before this axis).
SENTENCES_AXIS = "sentences"
SOURCE_AXIS = "src_len"  # source positions; padded on the right, covered by the source mask
PAST_AXIS = "past"  # cached target steps; padded on the left, covered by the cache mask
GROWN_PAST_AXIS = "past_plus_1"  # the cache a step returns: one step longer
PREVIOUS_BATCH_AXIS = "prev_batch"  # rows of the previous step's dynamic state
ZERO_ROWS_AXIS = "fresh"  # all-zero rows the step appends to that state
VOCAB_AXIS = "vocab"
CANDIDATES_AXIS = "k"

# Encoder graph input.
SOURCE_IDS = "src"  # (batch, src_len) int64, padded with PAD
# Decoder-step graph inputs, besides the static and dynamic state.
PREVIOUS_TOKENS = "prev"  # (batch,) int64: each row's last target token
PARENT_ROWS = "origin"  # (batch,) int64: the row of the previous state (then zero rows) each row continues
ZERO_ROWS = "fresh"  # (zero_rows,) int64, values unused: its length is how many all-zero rows to append
CANDIDATE_COUNT = "k"  # (1,) int64: how many best continuations TopK returns per row
FORCED_TOKENS = "forced"  # (batch,) int64: a token whose log-probability to return per row (target prefixes)
# Decoder-step graph outputs, besides the new dynamic state (NEW_STATE_PREFIX + name).
LOG_PROBS = "log_probs"  # (batch, vocab)
ATTENTION = "attention"  # (batch, src_len): the alignment row
TOP_LOG_PROBS = "top_log_probs"  # (batch, k), best first
TOP_IDS = "top_ids"  # (batch, k)
FORCED_LOG_PROBS = "forced_log_probs"  # (batch,)
NEW_STATE_PREFIX = "new_"


class BundleError(Exception):
    """A bundle is missing, incomplete, tampered with or of an unsupported format."""


class FormatVersionError(BundleError):
    """A manifest of another bundle format or format version than this attnserve reads."""

    def __init__(self, source: str, found_format: object, found_version: object, expected_format: str = FORMAT,
                 expected_version: int = FORMAT_VERSION):
        # The expected pair defaults to the translator bundle's; reader bundles pass their own.
        self.found_format, self.found_version = found_format, found_version
        self.expected_format, self.expected_version = expected_format, expected_version
        super().__init__(f"{source}: bundle format {found_format!r} version {found_version}; this attnserve reads "
                         f"{expected_format!r} version {expected_version} only: export the bundle again with this "
                         "version, or serve it with the attnserve that wrote it")


class ManifestError(BundleError):
    """A manifest that does not match its records; lists every problem found."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        super().__init__(f"{source}: invalid manifest:\n  " + "\n  ".join(problems))


# -- records -------------------------------------------------------------------------------------


class JsonRecord:
    """A frozen dataclass whose fields are its JSON keys, in order (conversion below)."""

    def to_json(self) -> dict[str, Any]:
        return _to_json(self)

    @classmethod
    def from_json(cls, data: object, source: str = "manifest") -> Any:
        """Read a record, reporting every problem at once (ManifestError)."""
        problems: list[str] = []
        record = _from_json(data, cls, "", problems)
        if problems:
            raise ManifestError(source, problems)
        return record


class VersionedManifest(JsonRecord):
    """What every manifest.json shares: `format` and `format_version` fields (the subclass's
    own, as dataclass fields with these defaults), checked before anything else is read and
    written first, as the exporters have always written them."""

    FORMAT_NAME: ClassVar[str]
    FORMAT_VERSION: ClassVar[int]

    def _check_format(self) -> None:
        if (self.format, self.format_version) != (self.FORMAT_NAME, self.FORMAT_VERSION):  # type: ignore[attr-defined]
            raise FormatVersionError("manifest", self.format, self.format_version,  # type: ignore[attr-defined]
                                     self.FORMAT_NAME, self.FORMAT_VERSION)

    def to_json(self) -> dict[str, Any]:
        data = _to_json(self)
        return {"format": data.pop("format"), "format_version": data.pop("format_version"), **data}

    @classmethod
    def from_json(cls, data: object, source: str = "manifest") -> Any:
        """Read a manifest, checking the format version first (a manifest of another version
        may have any layout), then every record, reporting every problem at once."""
        _require_format(data, source, cls.FORMAT_NAME, cls.FORMAT_VERSION)
        return super().from_json(data, source)

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2) + "\n"


@dataclasses.dataclass(frozen=True)
class TensorSignature(JsonRecord):
    """One graph input or output: its name, numpy dtype name and shape (axis names for symbolic
    dimensions, ints for fixed ones)."""

    name: str
    dtype: str
    shape: tuple[str | int, ...]

    def axis(self, axis_name: str) -> int | None:
        """Index of a symbolic axis, None if the tensor has no such axis."""
        return self.shape.index(axis_name) if axis_name in self.shape else None

    @property
    def output_name(self) -> str:
        """The name of this dynamic-state tensor as the step graph returns it, one step on."""
        return NEW_STATE_PREFIX + self.name

    def renamed_axis(self, old: str, new: str) -> TensorSignature:
        """The same tensor with its axis `old` called `new`."""
        return dataclasses.replace(self, shape=tuple(new if axis == old else axis for axis in self.shape))


@dataclasses.dataclass(frozen=True)
class StepSignature(JsonRecord):
    """The decoder state, split by how it changes.

    static    computed once by the encoder graph, read by every step (cross-attention keys and
              values, RNN memory and its attention-key projection, source mask and lengths);
    dynamic   carried from step to step (self-attention cache and positions, RNN hidden state);
              the step returns each one step on, as NEW_STATE_PREFIX + name. With
              dynamic_from_encoder (RNN) the encoder computes its initial value; otherwise
              (Transformer) it starts as zeros with empty PAST_AXIS (an empty, masked cache).

    Static tensors whose first axis is SENTENCES_AXIS (a Transformer's source mask and
    cross-attention keys and values) hold one row per sentence, shared by the sentence's beam
    rows in the step graph; the step graph reads them per row as well (K = 1). Static tensors
    over BATCH_AXIS hold one row per beam row."""

    static: tuple[TensorSignature, ...]
    dynamic: tuple[TensorSignature, ...]
    dynamic_from_encoder: bool

    @property
    def static_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.static)

    @property
    def dynamic_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.dynamic)

    @property
    def static_per_sentence(self) -> bool:
        """Whether the step graph takes the static state one row per sentence (SENTENCES_AXIS)."""
        return bool(self.static) and all(t.shape[0] == SENTENCES_AXIS for t in self.static)

    @property
    def encoder_outputs(self) -> tuple[str, ...]:
        """The encoder graph's outputs, in order."""
        return self.static_names + (self.dynamic_names if self.dynamic_from_encoder else ())

    @property
    def step_inputs(self) -> tuple[str, ...]:
        """The decoder-step graph's inputs, in order."""
        return ((PREVIOUS_TOKENS, PARENT_ROWS, ZERO_ROWS) + self.static_names + self.dynamic_names
                + (CANDIDATE_COUNT, FORCED_TOKENS))

    @property
    def new_state_outputs(self) -> tuple[str, ...]:
        return tuple(t.output_name for t in self.dynamic)

    @property
    def search_outputs(self) -> tuple[str, ...]:
        """What a search fetches from a step, in this order: the TopK candidates, the forced
        tokens' log-probabilities, the alignment row, then the new dynamic state."""
        return (TOP_LOG_PROBS, TOP_IDS, FORCED_LOG_PROBS, ATTENTION) + self.new_state_outputs

    def source_axes(self) -> dict[str, int]:
        """Static tensor -> its SOURCE_AXIS, for those that have one."""
        return {t.name: t.axis(SOURCE_AXIS) for t in self.static if t.axis(SOURCE_AXIS) is not None}

    def past_axes(self) -> dict[str, int]:
        """Dynamic tensor -> its PAST_AXIS, for those that have one (the cache)."""
        return {t.name: t.axis(PAST_AXIS) for t in self.dynamic if t.axis(PAST_AXIS) is not None}


@dataclasses.dataclass(frozen=True)
class ValidationRecord(JsonRecord):
    """What export measured for one precision against torch (export/validate.py). Fields that a
    check did not run for (no dev or test split; beam search on fp32 only) are None and absent
    from the JSON."""

    provider: str  # the onnxruntime execution provider it was validated on
    max_abs_diff_random: float  # encoder outputs and decoder steps, random inputs
    max_rel_diff_random: float
    max_abs_diff_dev: float | None = None  # the same on dev sentences
    max_rel_diff_dev: float | None = None
    dev_sentences: int | None = None
    greedy_identical: float | None = None  # share of dev sentences with torch's greedy tokens
    beam4_identical: float | None = None  # the same for beam 4 (fp32)
    test_sentences: int | None = None
    test_bleu_torch: float | None = None
    test_bleu: float | None = None
    bleu_difference: float | None = None


@dataclasses.dataclass(frozen=True)
class GraphFiles(JsonRecord):
    """The graphs of one precision, as paths relative to the bundle."""

    encoder: str
    decoder_step: str


@dataclasses.dataclass(frozen=True)
class PrecisionRecord(JsonRecord):
    files: GraphFiles
    node_types: Mapping[str, Mapping[str, int]]  # graph -> ONNX op type -> count
    validation: ValidationRecord | None = None  # None only while export is validating it


@dataclasses.dataclass(frozen=True)
class Languages(JsonRecord):
    source: str
    target: str


@dataclasses.dataclass(frozen=True)
class Manifest(VersionedManifest):
    """manifest.json. `files` maps every other file of the bundle to its sha256 (the manifest
    cannot contain its own)."""

    created: str  # ISO 8601, UTC
    architecture: str  # transformer / rnn
    attention: str  # a description, e.g. "multi-head scaled dot-product"
    label: str
    model_config: Mapping[str, Any]  # the training run's model config, as it wrote it
    parameters: int
    languages: Languages
    vocab_size: int
    special_ids: SpecialIds
    max_len: int  # positions the model has: sources and targets are at most max_len - 1 tokens
    decoding: LengthLimit  # the default target length limit
    opset: int
    ir_version: int
    state: StepSignature
    tokenizer: str  # path of the SentencePiece model
    precisions: Mapping[str, PrecisionRecord]
    unfused_node_types: Mapping[str, Mapping[str, int]]  # the same graphs without fused attention (Transformer)
    source_checkpoint: Mapping[str, Any]  # the run, checkpoint and its meta.json
    versions: Mapping[str, str]  # of torch, onnx, onnxruntime and attnserve that wrote it
    command: str = ""
    files: Mapping[str, str] = dataclasses.field(default_factory=dict)  # path -> sha256
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    FORMAT_NAME: ClassVar[str] = FORMAT
    FORMAT_VERSION: ClassVar[int] = FORMAT_VERSION

    def __post_init__(self) -> None:
        self._check_format()
        for record in [self, *self.precisions.values()]:  # read-only mappings: a manifest does not change
            _freeze_mappings(record)

    def validation_of(self, precision: str) -> ValidationRecord | None:
        """What export measured for this precision; None for a precision the bundle lacks."""
        record = self.precisions.get(precision)
        return record.validation if record is not None else None

    @classmethod
    def read(cls, path: Path) -> Manifest:
        return cls.from_json(_read_json(path), str(path))


# -- image reader bundles ------------------------------------------------------------------------
# The house-number reader's bundle (export/reader.py writes it, server/reader.py reads it):
#
#     OUT/manifest.json            ReaderManifest.to_json(), every other file named with its sha256
#     OUT/fp32/encoder.onnx        PIXELS (batch, H, W, C) uint8 -> memory, keys, hidden[, cell]
#     OUT/fp32/decoder_step.onnx   PREVIOUS_TOKENS (batch,) int64, memory, keys, hidden[, cell]
#                                  -> LOG_PROBS (batch, V), ATTENTION (batch, rows * cols), new_hidden[, new_cell]
#
# Version 1 is the layout of every reader bundle written so far (from_json(m).to_json() == m).

READER_FORMAT = "attnserve-reader"
READER_FORMAT_VERSION = 1

PIXELS = "pixels"  # the encoder graph's input: (batch, height, width, channels) uint8, as decoded
READER_STATIC_STATE = ("memory", "keys")  # encoder outputs every step reads; the rest is carried step to step
DIGITS = 10  # symbols digit_offset .. digit_offset + 9 are the digits 0 .. 9


@dataclasses.dataclass(frozen=True)
class Normalisation(JsonRecord):
    """(pixel - mean) / std, per channel value; in_graph: the encoder graph applies it, so a client
    feeds decoded pixels as they are."""

    mean: float
    std: float
    in_graph: bool


@dataclasses.dataclass(frozen=True)
class ImageInput(JsonRecord):
    """What the encoder graph reads: an image of height x width x channels, as described."""

    kind: str  # "image"
    height: int
    width: int
    channels: int
    colour: str  # e.g. "RGB"
    dtype: str  # numpy dtype name of the pixels, e.g. "uint8"
    layout: str  # e.g. "NHWC"
    resize: str  # how a client fits an image of another size, in words
    normalisation: Normalisation


@dataclasses.dataclass(frozen=True)
class Grid(JsonRecord):
    """The annotation grid an attention map covers: rows x cols cells of the input image, each
    cell_height x cell_width pixels; a map of rows * cols weights is in `order`."""

    rows: int
    cols: int
    cell_height: float
    cell_width: float
    order: str  # "row-major"


@dataclasses.dataclass(frozen=True)
class ReaderGraph(JsonRecord):
    """One graph: its path relative to the bundle and its input and output names, in order."""

    file: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class ReaderGraphs(JsonRecord):
    encoder: ReaderGraph
    decoder_step: ReaderGraph

    @property
    def dynamic_state(self) -> tuple[str, ...]:
        """The encoder outputs the step carries (and returns one step on, after LOG_PROBS and
        ATTENTION): hidden[, cell]."""
        return tuple(name for name in self.encoder.outputs if name not in READER_STATIC_STATE)


@dataclasses.dataclass(frozen=True)
class ReaderValidation(JsonRecord):
    """Export's parity check against torch: greedy readings of held-out images, teacher-forced on
    torch's symbols so that every step compares the same inputs."""

    images: int
    identical_readings: int  # images whose readings are torch's, symbol for symbol
    max_abs_score_diff: float  # summed log-probability of a reading
    max_abs_attention_diff: float  # any attention weight of any step
    atol: float
    split: str  # the images' file


@dataclasses.dataclass(frozen=True)
class ReaderManifest(VersionedManifest):
    """A reader bundle's manifest.json. `files` maps every other file of the bundle to its sha256
    (the manifest cannot contain its own)."""

    task: str  # "read"
    model: str  # the run's label
    attention: str  # soft / hard / ...
    parameters: int
    input: ImageInput
    grid: Grid
    vocabulary: tuple[str, ...]  # symbol id -> its text
    special_ids: SpecialIds
    digit_offset: int  # the id of the digit 0; digits are digit_offset .. digit_offset + 9
    max_symbols: int  # decoder steps at most (EOS counted)
    graphs: ReaderGraphs
    source: Mapping[str, Any]  # the run, checkpoint and its training step
    validation: ReaderValidation | None = None  # None only while export is validating the graphs
    files: Mapping[str, str] = dataclasses.field(default_factory=dict)  # path -> sha256
    format: str = READER_FORMAT
    format_version: int = READER_FORMAT_VERSION

    FORMAT_NAME: ClassVar[str] = READER_FORMAT
    FORMAT_VERSION: ClassVar[int] = READER_FORMAT_VERSION

    def __post_init__(self) -> None:
        self._check_format()
        _freeze_mappings(self)  # read-only: a manifest does not change under the reader that reads it

    def problems(self) -> list[str]:
        """Every way this manifest falls short of a complete, self-consistent bundle: the grid
        must tile the input, the vocabulary hold the special ids and the digits where the ids say,
        the graphs chain into one another, and every graph be among the hashed files."""
        problems: list[str] = []
        size, grid = self.input, self.grid
        if grid.rows < 1 or grid.cols < 1:
            problems.append(f"grid: {grid.rows} x {grid.cols} cells; at least one of each expected")
        elif max(abs(grid.rows * grid.cell_height - size.height), abs(grid.cols * grid.cell_width - size.width)) > 1e-6:
            problems.append(f"grid: {grid.rows} x {grid.cols} cells of {grid.cell_height} x {grid.cell_width} do not "
                            f"tile the {size.height} x {size.width} input")
        if len(self.vocabulary) != self.digit_offset + DIGITS:
            problems.append(f"vocabulary: {len(self.vocabulary)} symbols; digit_offset {self.digit_offset} + "
                            f"{DIGITS} digits expected")
        elif list(self.vocabulary[self.digit_offset:]) != [str(d) for d in range(DIGITS)]:
            problems.append(f"vocabulary: the digits 0-9 expected from digit_offset {self.digit_offset}, got "
                            f"{list(self.vocabulary[self.digit_offset:])}")
        for name, index in dataclasses.asdict(self.special_ids).items():
            if not 0 <= index < min(len(self.vocabulary), self.digit_offset):
                problems.append(f"special_ids.{name}: {index} is not a special symbol of the vocabulary")
        encoder, step = self.graphs.encoder, self.graphs.decoder_step
        if encoder.inputs != (PIXELS,):
            problems.append(f"graphs.encoder.inputs: ({PIXELS!r},) expected, got {encoder.inputs}")
        if step.inputs != (PREVIOUS_TOKENS, *encoder.outputs):  # the step reads what the encoder returns
            problems.append(f"graphs.decoder_step.inputs: {(PREVIOUS_TOKENS, *encoder.outputs)} (prev, then the "
                            f"encoder's outputs) expected, got {step.inputs}")
        new_state = tuple(NEW_STATE_PREFIX + name for name in self.graphs.dynamic_state)
        if step.outputs != (LOG_PROBS, ATTENTION, *new_state):
            problems.append(f"graphs.decoder_step.outputs: {(LOG_PROBS, ATTENTION, *new_state)} expected, "
                            f"got {step.outputs}")
        for where, graph in (("graphs.encoder", encoder), ("graphs.decoder_step", step)):
            if graph.file not in self.files:
                problems.append(f"{where}.file: {graph.file!r} is not among the files (and their sha256s)")
        for name in self.files:  # verification reads these: they must stay inside the bundle
            if name.startswith("/") or ".." in name.split("/"):
                problems.append(f"files: {name!r} is not a path inside the bundle")
        if self.validation is None:
            problems.append("validation: missing (export writes it once the graphs match torch)")
        elif not 0 <= self.validation.identical_readings <= self.validation.images:
            problems.append(f"validation: {self.validation.identical_readings} identical readings of "
                            f"{self.validation.images} images")
        return problems

    def validate(self, source: str = "manifest") -> ReaderManifest:
        """This manifest, if it describes a complete bundle; ManifestError listing every problem
        otherwise."""
        if problems := self.problems():
            raise ManifestError(source, problems)
        return self

    @classmethod
    def read(cls, path: Path) -> ReaderManifest:
        """A written bundle's manifest: its records, then the whole (validate)."""
        return cls.from_json(_read_json(path), str(path)).validate(str(path))


# -- JSON conversion -----------------------------------------------------------------------------
# One generic reader and writer driven by the records' type hints, so that a record's fields are
# its JSON keys, in order, and a new field needs no conversion code.


def _require_format(data: object, source: str, expected_format: str, expected_version: int) -> None:
    """Refuse what is not a JSON object of this format and version, before reading any record."""
    if not isinstance(data, Mapping):
        raise ManifestError(source, [f"a JSON object expected, got {type(data).__name__}"])
    if (data.get("format"), data.get("format_version")) != (expected_format, expected_version):
        raise FormatVersionError(source, data.get("format"), data.get("format_version"), expected_format,
                                 expected_version)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON: {exc}") from exc


def _freeze_mappings(record: Any) -> None:
    """Make a frozen record's mapping fields read-only views (in place, as __post_init__ may)."""
    for field in dataclasses.fields(record):
        value = getattr(record, field.name)
        if isinstance(value, Mapping):
            object.__setattr__(record, field.name, _frozen(value))


def _frozen(value: Any) -> Any:
    """A read-only copy of JSON-like data: mappings become read-only views, lists tuples."""
    if isinstance(value, Mapping):
        return types.MappingProxyType({k: _frozen(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


def _to_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        # Optional fields left at None are absent from the JSON.
        return {f.name: _to_json(getattr(value, f.name)) for f in dataclasses.fields(value)
                if getattr(value, f.name) is not None}
    if isinstance(value, Mapping):
        return {k: _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    return value


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(record: type) -> dict[str, Any]:
    if record not in _HINTS:
        _HINTS[record] = typing.get_type_hints(record)
    return _HINTS[record]


def _describe(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _from_json(value: Any, hint: Any, where: str, problems: list[str]) -> Any:
    """`value` read as `hint`; what does not fit is added to `problems` (and read as None)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return _frozen(value)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _from_json(value, options[0], where, problems)
        if any(_is_scalar(value, a) for a in options):  # e.g. str | int: a shape's axis
            return value
        problems.append(f"{where}: {_describe(hint)} expected, got {value!r}")
        return None
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            problems.append(f"{where or 'manifest'}: an object ({hint.__name__}) expected, got {value!r}")
            return None
        fields, problems_before = {f.name: f for f in dataclasses.fields(hint)}, len(problems)
        for key in value:
            if key not in fields:
                problems.append(f"{_join(where, key)}: unknown field")
        arguments = {}
        for name, field in fields.items():
            if name in value:
                arguments[name] = _from_json(value[name], _hints(hint)[name], _join(where, name), problems)
            elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                problems.append(f"{_join(where, name)}: missing")
        if len(problems) > problems_before:
            return None
        return hint(**arguments)
    if origin is tuple:
        if not isinstance(value, list):
            problems.append(f"{where}: a list expected, got {value!r}")
            return None
        return tuple(_from_json(v, args[0], f"{where}[{i}]", problems) for i, v in enumerate(value))
    if origin is Mapping:
        if not isinstance(value, Mapping):
            problems.append(f"{where}: an object expected, got {value!r}")
            return None
        return {k: _from_json(v, args[1], _join(where, k), problems) for k, v in value.items()}
    if not _is_scalar(value, hint):
        problems.append(f"{where}: {_describe(hint)} expected, got {value!r}")
        return None
    return float(value) if hint is float else value


def _is_scalar(value: Any, hint: Any) -> bool:
    if isinstance(value, bool) and hint is not bool:  # JSON true is not a number
        return False
    if hint is float:
        return isinstance(value, (int, float))
    return isinstance(hint, type) and isinstance(value, hint)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key
