from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TextFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TEXT_FORMAT_UNSPECIFIED: _ClassVar[TextFormat]
    SENTENCE: _ClassVar[TextFormat]
    DOCUMENT: _ClassVar[TextFormat]
    HTML: _ClassVar[TextFormat]
    XML: _ClassVar[TextFormat]
TEXT_FORMAT_UNSPECIFIED: TextFormat
SENTENCE: TextFormat
DOCUMENT: TextFormat
HTML: TextFormat
XML: TextFormat

class TranslationOptions(_message.Message):
    __slots__ = ("beam_size", "nbest", "length_penalty", "max_length", "return_alignment", "text_format", "glossary", "low_confidence")
    BEAM_SIZE_FIELD_NUMBER: _ClassVar[int]
    NBEST_FIELD_NUMBER: _ClassVar[int]
    LENGTH_PENALTY_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    RETURN_ALIGNMENT_FIELD_NUMBER: _ClassVar[int]
    TEXT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    GLOSSARY_FIELD_NUMBER: _ClassVar[int]
    LOW_CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    beam_size: int
    nbest: int
    length_penalty: float
    max_length: int
    return_alignment: bool
    text_format: TextFormat
    glossary: _containers.RepeatedCompositeFieldContainer[GlossaryEntry]
    low_confidence: float
    def __init__(self, beam_size: _Optional[int] = ..., nbest: _Optional[int] = ..., length_penalty: _Optional[float] = ..., max_length: _Optional[int] = ..., return_alignment: _Optional[bool] = ..., text_format: _Optional[_Union[TextFormat, str]] = ..., glossary: _Optional[_Iterable[_Union[GlossaryEntry, _Mapping]]] = ..., low_confidence: _Optional[float] = ...) -> None: ...

class GlossaryEntry(_message.Message):
    __slots__ = ("source", "target")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    source: str
    target: str
    def __init__(self, source: _Optional[str] = ..., target: _Optional[str] = ...) -> None: ...

class Segment(_message.Message):
    __slots__ = ("source", "translation", "confidence", "flags")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TRANSLATION_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    source: str
    translation: str
    confidence: float
    flags: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, source: _Optional[str] = ..., translation: _Optional[str] = ..., confidence: _Optional[float] = ..., flags: _Optional[_Iterable[str]] = ...) -> None: ...

class TranslateRequest(_message.Message):
    __slots__ = ("model", "version", "sentences", "options")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SENTENCES_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    sentences: _containers.RepeatedScalarFieldContainer[str]
    options: TranslationOptions
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., sentences: _Optional[_Iterable[str]] = ..., options: _Optional[_Union[TranslationOptions, _Mapping]] = ...) -> None: ...

class AlignmentRow(_message.Message):
    __slots__ = ("weights",)
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    weights: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, weights: _Optional[_Iterable[float]] = ...) -> None: ...

class Hypothesis(_message.Message):
    __slots__ = ("text", "score", "target_tokens", "alignment")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    TARGET_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ALIGNMENT_FIELD_NUMBER: _ClassVar[int]
    text: str
    score: float
    target_tokens: _containers.RepeatedScalarFieldContainer[str]
    alignment: _containers.RepeatedCompositeFieldContainer[AlignmentRow]
    def __init__(self, text: _Optional[str] = ..., score: _Optional[float] = ..., target_tokens: _Optional[_Iterable[str]] = ..., alignment: _Optional[_Iterable[_Union[AlignmentRow, _Mapping]]] = ...) -> None: ...

class Translation(_message.Message):
    __slots__ = ("hypotheses", "source_tokens", "confidence", "flags", "placeholders", "segments")
    HYPOTHESES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    PLACEHOLDERS_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    hypotheses: _containers.RepeatedCompositeFieldContainer[Hypothesis]
    source_tokens: _containers.RepeatedScalarFieldContainer[str]
    confidence: float
    flags: _containers.RepeatedScalarFieldContainer[str]
    placeholders: _containers.RepeatedScalarFieldContainer[str]
    segments: _containers.RepeatedCompositeFieldContainer[Segment]
    def __init__(self, hypotheses: _Optional[_Iterable[_Union[Hypothesis, _Mapping]]] = ..., source_tokens: _Optional[_Iterable[str]] = ..., confidence: _Optional[float] = ..., flags: _Optional[_Iterable[str]] = ..., placeholders: _Optional[_Iterable[str]] = ..., segments: _Optional[_Iterable[_Union[Segment, _Mapping]]] = ...) -> None: ...

class TranslateResponse(_message.Message):
    __slots__ = ("translations", "model", "version")
    TRANSLATIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    translations: _containers.RepeatedCompositeFieldContainer[Translation]
    model: str
    version: str
    def __init__(self, translations: _Optional[_Iterable[_Union[Translation, _Mapping]]] = ..., model: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class TranslateStreamRequest(_message.Message):
    __slots__ = ("id", "sentence", "model", "version", "options")
    ID_FIELD_NUMBER: _ClassVar[int]
    SENTENCE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    id: str
    sentence: str
    model: str
    version: str
    options: TranslationOptions
    def __init__(self, id: _Optional[str] = ..., sentence: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[str] = ..., options: _Optional[_Union[TranslationOptions, _Mapping]] = ...) -> None: ...

class Status(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class TranslateStreamResponse(_message.Message):
    __slots__ = ("id", "translation", "error", "model", "version")
    ID_FIELD_NUMBER: _ClassVar[int]
    TRANSLATION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    id: str
    translation: Translation
    error: Status
    model: str
    version: str
    def __init__(self, id: _Optional[str] = ..., translation: _Optional[_Union[Translation, _Mapping]] = ..., error: _Optional[_Union[Status, _Mapping]] = ..., model: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "source_language", "target_language", "architecture", "attention", "precision", "execution_provider", "state", "state_reason", "parameters", "test_bleu", "is_default")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[ModelInfo.State]
        LOADING: _ClassVar[ModelInfo.State]
        READY: _ClassVar[ModelInfo.State]
        FAILED: _ClassVar[ModelInfo.State]
        UNLOADED: _ClassVar[ModelInfo.State]
    STATE_UNSPECIFIED: ModelInfo.State
    LOADING: ModelInfo.State
    READY: ModelInfo.State
    FAILED: ModelInfo.State
    UNLOADED: ModelInfo.State
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    TARGET_LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STATE_REASON_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    TEST_BLEU_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    source_language: str
    target_language: str
    architecture: str
    attention: str
    precision: str
    execution_provider: str
    state: ModelInfo.State
    state_reason: str
    parameters: int
    test_bleu: float
    is_default: bool
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., source_language: _Optional[str] = ..., target_language: _Optional[str] = ..., architecture: _Optional[str] = ..., attention: _Optional[str] = ..., precision: _Optional[str] = ..., execution_provider: _Optional[str] = ..., state: _Optional[_Union[ModelInfo.State, str]] = ..., state_reason: _Optional[str] = ..., parameters: _Optional[int] = ..., test_bleu: _Optional[float] = ..., is_default: _Optional[bool] = ...) -> None: ...
