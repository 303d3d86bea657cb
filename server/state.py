"""The decoder state of the rows a search is decoding, kept where the step graph reads it.

Static tensors (cross-attention keys/values, RNN memory) live in host buffers with room to
spare; the rows in use are the first `rows`, wrapped as OrtValues without a copy (CPU) or copied
to the device once per change (CUDA). Joining rows are written after them, and rows leaving are
replaced by rows moved from the end: both cost only the rows that change. When the bundle's step
graph takes its static state per sentence (StepSignature.static_per_sentence), the buffers hold
one entry per sentence, shared by its `rows_per_sentence` consecutive rows; rows then come and go
by whole sentences.

The dynamic state (key/value cache, RNN hidden state) stays in the OrtValues onnxruntime
returned, on the provider's device. The step graph gathers it by `parent_rows`: row i continues
row parent_rows[i] of the previous step's state followed by `zero_rows` all-zero rows. That is
how beams are reordered, finished rows dropped and (Transformer) new sentences added with empty
caches, with no host copy. (A fresh row's cached keys and values are a copy of a previous row
that its all-zero cache mask hides, so the graph never copies the cache to append zeros.) An RNN's initial state comes from the encoder, so its joining rows
are merged on the host (the RNN state is one vector a row).

Padding: source axes are padded on the right (the source mask covers it), cached-step axes on
the left (the cache mask covers it).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from attnserve.bundle_format import StepSignature

# A running batch's key/value cache is cut back to the steps its rows need once it is more than
# twice that plus this many steps wide.
TRIM_SLACK = 16

# Array -> an OrtValue on the provider's device (runtime.OnnxRuntime.to_device).
ToDevice = Callable[[np.ndarray], object]


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """Where the state tensors' padded axes are, from the bundle's step signature (once per engine)."""

    static_names: tuple[str, ...]
    dynamic_names: tuple[str, ...]
    source_axis: Mapping[str, int]  # static tensor -> its axis over source positions
    past_axis: Mapping[str, int]  # dynamic tensor -> its axis over cached target steps
    dynamic_from_encoder: bool
    static_per_sentence: bool = False  # the static tensors hold one row per sentence

    @classmethod
    def of(cls, signature: StepSignature) -> StateLayout:
        return cls(signature.static_names, signature.dynamic_names, signature.source_axes(), signature.past_axes(),
                   signature.dynamic_from_encoder, signature.static_per_sentence)


def fit_axis(array: np.ndarray, axis: int | None, width: int, left: bool = False) -> np.ndarray:
    """`array` with `axis` cut or zero-padded (False for masks) to `width`: keeping the first
    entries and padding after them, or with `left` the last ones and padding before them.
    axis None: the array as it is (a tensor without such an axis)."""
    if axis is None or array.shape[axis] == width:
        return array
    size = array.shape[axis]
    if size > width:
        cut = slice(size - width, None) if left else slice(0, width)
        return array[(slice(None),) * axis + (cut,)]
    pad = [(0, 0)] * array.ndim
    pad[axis] = (width - size, 0) if left else (0, width - size)
    return np.pad(array, pad)


@functools.lru_cache(maxsize=512)
def identity_rows(rows: int) -> np.ndarray:
    """0 .. rows-1 as int64, read only: the parent rows of a state just stepped, made once per size
    (every batch-1 step needs one). Every change of parent rows makes a new array."""
    rows_array = np.arange(rows, dtype=np.int64)
    rows_array.flags.writeable = False
    return rows_array


def grown_buffer(array: np.ndarray, capacity: int, source_axis: int | None, source_width: int) -> np.ndarray:
    """A zeroed buffer of `capacity` rows (and `source_width` along the source axis) holding `array`."""
    fitted = fit_axis(array, source_axis, source_width)
    out = np.zeros((capacity,) + fitted.shape[1:], dtype=array.dtype)
    out[: len(array)] = fitted
    return out


class DecoderState:
    """The static and dynamic decoder state of the rows in use (module docstring)."""

    def __init__(self, layout: StateLayout, to_device: ToDevice, tensors: Mapping[str, np.ndarray],
                 rows_per_sentence: int = 1):
        """`tensors`: the static state (one row per sentence if the layout says so, else per row)
        and the initial dynamic state (per row); `rows_per_sentence`: the rows (beams) a sentence
        has, which share its static row."""
        self.layout, self.to_device = layout, to_device
        self.group = rows_per_sentence if layout.static_per_sentence else 1  # rows a static entry serves
        self.rows = len(tensors[layout.static_names[0]]) * self.group  # rows in use
        self.buffers = {name: np.ascontiguousarray(tensors[name]) for name in layout.static_names}  # (capacity, ...)
        self.dynamic = {name: to_device(tensors[name]) for name in layout.dynamic_names}
        self.previous_rows = self.rows  # rows of the dynamic state the next step reads
        self.parent_rows = identity_rows(self.rows)  # (rows,) into previous rows, then zero rows
        self.zero_rows = 0  # all-zero rows the next step appends to the dynamic state
        # The cached steps the dynamic state holds at most (each step adds one), or None if not
        # known: bound_cache reads the width from onnxruntime only when this says a trim may be due.
        self._past_bound: int | None = None
        self._wrap_static()

    def _wrap_static(self) -> None:
        self.static = {name: self.to_device(buffer[: self.rows // self.group]) for name, buffer in self.buffers.items()}

    @property
    def source_width(self) -> int:
        """Source positions the static buffers hold (the widest source in the batch, or wider)."""
        name, axis = next(iter(self.layout.source_axis.items()))
        return self.buffers[name].shape[axis]

    def stepped(self, new_dynamic: Sequence[object], rows: int) -> None:
        """A step ran on `rows` rows and returned this dynamic state (in the layout's order)."""
        self.dynamic = dict(zip(self.layout.dynamic_names, new_dynamic))
        self.previous_rows = rows
        self.parent_rows = identity_rows(rows)
        self.zero_rows = 0
        if self._past_bound is not None:
            self._past_bound += 1

    def reorder(self, parent_rows: np.ndarray) -> None:
        """Row i continues row parent_rows[i] (beam search)."""
        self.parent_rows = self.parent_rows[parent_rows]

    def keep_rows(self, rows: np.ndarray, longest_source: int) -> None:
        """Row i becomes the current row rows[i]; rows not listed leave. `longest_source`: the
        longest source left; the buffers narrow to it once they are twice as wide (a long
        sentence that has left must not make every later step attend over its padding)."""
        self.parent_rows = self.parent_rows[rows]
        entries = self._static_entries(rows)
        moved = np.flatnonzero(entries != np.arange(len(entries)))
        for buffer in self.buffers.values():
            buffer[moved] = buffer[entries[moved]]  # the right side is read (copied) first
        self.rows = len(rows)
        if 2 * longest_source < self.source_width:
            self.buffers = {name: np.ascontiguousarray(fit_axis(buffer, self.layout.source_axis.get(name), longest_source))
                            for name, buffer in self.buffers.items()}
        self._wrap_static()

    def _static_entries(self, rows: np.ndarray) -> np.ndarray:
        """The static entries that the rows `rows` read: the rows themselves, or with a static
        row per sentence each sentence's, which requires the rows to come in whole sentences."""
        if self.group == 1:
            return rows
        entries = rows[:: self.group] // self.group
        if len(rows) % self.group or not np.array_equal(rows, (entries[:, None] * self.group + np.arange(self.group)).reshape(-1)):
            raise ValueError(f"rows must keep whole sentences of {self.group} consecutive rows, got {rows.tolist()}")
        return entries

    def join(self, joining: Mapping[str, np.ndarray]) -> None:
        """Append the rows of freshly encoded sentences (`joining`: encoder outputs and initial
        dynamic state, as for __init__). Source axes are padded to the widest source (masked by
        the source mask)."""
        layout, entries = self.layout, self.rows // self.group
        added_entries = len(joining[layout.static_names[0]])
        added = added_entries * self.group
        if layout.dynamic_names and len(joining[layout.dynamic_names[0]]) != added:
            raise ValueError(f"{added_entries} static entries of {self.group} rows each cannot join with "
                             f"{len(joining[layout.dynamic_names[0]])} rows of dynamic state")
        width = max(self.source_width, *(joining[name].shape[axis] for name, axis in layout.source_axis.items()))
        capacity = len(next(iter(self.buffers.values())))
        if width > self.source_width or entries + added_entries > capacity:
            if entries + added_entries > capacity:
                capacity = max(2 * capacity, entries + added_entries)
            for name, buffer in self.buffers.items():
                self.buffers[name] = grown_buffer(buffer[:entries], capacity, layout.source_axis.get(name), width)
        for name, buffer in self.buffers.items():
            buffer[entries : entries + added_entries] = fit_axis(joining[name], layout.source_axis.get(name), width)
        self.rows += added
        self._wrap_static()
        if layout.dynamic_from_encoder:
            self.dynamic = {name: self.to_device(np.concatenate([value.numpy()[self.parent_rows], joining[name]]))
                            for name, value in self.dynamic.items()}
            self._past_bound = None
            self.previous_rows, self.parent_rows, self.zero_rows = self.rows, identity_rows(self.rows), 0
        elif self.previous_rows == 0:  # nothing to continue (a state started empty): a fresh state
            self.dynamic = {name: self.to_device(np.zeros((self.rows,) + joining[name].shape[1:], dtype=joining[name].dtype))
                            for name in layout.dynamic_names}
            self._past_bound = None
            self.previous_rows, self.parent_rows, self.zero_rows = self.rows, identity_rows(self.rows), 0
        else:  # all-zero initial state: the step graph appends it (see zero_rows); the step
            # graph's fresh key/value rows copy a previous row, hence previous_rows > 0 here
            start = self.previous_rows + self.zero_rows
            self.parent_rows = np.concatenate([self.parent_rows, np.arange(start, start + added, dtype=np.int64)])
            self.zero_rows += added

    def past_width(self) -> int:
        """Cached target steps the dynamic state holds (0 without a cache). Every cached
        tensor has the same width, so one is read: the search asks every step, and reading an
        OrtValue's shape is a call into onnxruntime."""
        past_axis = self.layout.past_axis
        name = next((name for name in self.dynamic if name in past_axis), None)
        return self.dynamic[name].shape()[past_axis[name]] if name is not None else 0

    def bound_cache(self, steps_needed: int) -> None:
        """The next step needs at most `steps_needed` cached steps: cut the cache back to them
        once it is more than twice that (plus TRIM_SLACK) wide. A batch that keeps running while
        sentences come and go would otherwise cache steps forever; trimming copies the cache
        through the host, hence only now and then."""
        if not self.layout.past_axis:
            return
        limit = 2 * steps_needed + TRIM_SLACK
        if self._past_bound is not None and self._past_bound <= limit:
            return
        self._past_bound = self.past_width()
        if self._past_bound > limit:
            self.trim_cache(steps_needed)

    def trim_cache(self, keep: int) -> None:
        """Keep the last `keep` cached steps of every row."""
        dynamic = {}
        for name, value in self.dynamic.items():
            host = value.numpy()
            if self.zero_rows:
                host = np.concatenate([host, np.zeros((self.zero_rows,) + host.shape[1:], dtype=host.dtype)])
            host = host[self.parent_rows]
            dynamic[name] = self.to_device(fit_axis(host, self.layout.past_axis.get(name), keep, left=True))
        self.dynamic = dynamic
        self.previous_rows, self.parent_rows, self.zero_rows = self.rows, identity_rows(self.rows), 0
        self._past_bound = keep
