from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReadRequest(_message.Message):
    __slots__ = ("images", "model", "version")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedScalarFieldContainer[bytes]
    model: str
    version: str
    def __init__(self, images: _Optional[_Iterable[bytes]] = ..., model: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class ReadResponse(_message.Message):
    __slots__ = ("readings", "model", "version", "grid")
    READINGS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    GRID_FIELD_NUMBER: _ClassVar[int]
    readings: _containers.RepeatedCompositeFieldContainer[Reading]
    model: str
    version: str
    grid: Grid
    def __init__(self, readings: _Optional[_Iterable[_Union[Reading, _Mapping]]] = ..., model: _Optional[str] = ..., version: _Optional[str] = ..., grid: _Optional[_Union[Grid, _Mapping]] = ...) -> None: ...

class Grid(_message.Message):
    __slots__ = ("rows", "cols", "input_height", "input_width", "cell_height", "cell_width")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLS_FIELD_NUMBER: _ClassVar[int]
    INPUT_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    INPUT_WIDTH_FIELD_NUMBER: _ClassVar[int]
    CELL_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    CELL_WIDTH_FIELD_NUMBER: _ClassVar[int]
    rows: int
    cols: int
    input_height: int
    input_width: int
    cell_height: float
    cell_width: float
    def __init__(self, rows: _Optional[int] = ..., cols: _Optional[int] = ..., input_height: _Optional[int] = ..., input_width: _Optional[int] = ..., cell_height: _Optional[float] = ..., cell_width: _Optional[float] = ...) -> None: ...

class Reading(_message.Message):
    __slots__ = ("text", "score", "symbols")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SYMBOLS_FIELD_NUMBER: _ClassVar[int]
    text: str
    score: float
    symbols: _containers.RepeatedCompositeFieldContainer[SymbolAttention]
    def __init__(self, text: _Optional[str] = ..., score: _Optional[float] = ..., symbols: _Optional[_Iterable[_Union[SymbolAttention, _Mapping]]] = ...) -> None: ...

class SymbolAttention(_message.Message):
    __slots__ = ("symbol", "weights")
    SYMBOL_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    symbol: str
    weights: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, symbol: _Optional[str] = ..., weights: _Optional[_Iterable[float]] = ...) -> None: ...
