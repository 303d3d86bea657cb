"""Real-world text through the model: documents, markup, placeholders, glossaries, confidence.

See attnserve.server.text.pipeline for the interface and docs/text.md for what each stage does.
"""

from attnserve.server.text.glossary import Glossary, GlossaryEntry, GlossaryError
from attnserve.server.text.pipeline import (PipelineConfig, Plan, SegmentResult, TextError, TextFormat, TextItem,
                                            TextPipeline, TextResult, engine_translator)

__all__ = ["Glossary", "GlossaryEntry", "GlossaryError", "PipelineConfig", "Plan", "SegmentResult", "TextError",
           "TextFormat", "TextItem", "TextPipeline", "TextResult", "engine_translator"]
