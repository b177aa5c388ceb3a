"""Training data for Astrea: pre-alignment stage datasets and instruction-tuning datasets.

Every dataset is a :class:`datasets.Dataset` of TRL's conversational vision-language rows
(:mod:`.rows`). Sources: COCO captions / instances / tags (:mod:`.coco`), LLaVA conversations
(:mod:`.llava`), the offline synthetic world (:mod:`.synthetic_source`); stage targets with
cumulative labels (:mod:`.targets`); instruction rows from QA records (:mod:`.qa`); malformed
records are counted in a :class:`BuildReport` (:mod:`.report`); a recipe's ``data`` section is read
by :mod:`.from_recipe`. Text forms and formats: ``docs/training_data.md``.
"""

from ...geometry import (
    DEFAULT_MAX_VERTICES,
    DEFAULT_TOLERANCE,
    GRID,
    box_from_mask,
    format_box,
    format_polygon,
    mask_to_polygons,
    parse_boxes,
    parse_labelled_boxes,
    polygon_area,
    polygon_text,
    rle_counts_to_string,
    rle_decode,
    rle_encode,
    rle_string_to_counts,
    simplify_polygon,
    to_grid,
)
from ..stages import ORDERS, STAGES, normalise_order, stage_roles
from .annotations import AlignmentSource, AnnotatedImage, ObjectAnnotation
from .coco import load_coco
from .from_recipe import instruct_dataset, load_source, stage_dataset
from .llava import llava_record_to_row, load_llava
from .qa import build_qa_dataset, qa_to_row
from .report import PROBLEM_KINDS, BuildReport, InvalidDataError
from .rows import single_turn_row
from .synthetic_source import source_from_scenes, synthetic_scenes, synthetic_source
from .targets import (
    STAGE_HEADERS,
    STAGE_WORDS,
    build_stage_dataset,
    build_stage_datasets,
    fit_stage_target,
    sequence_length_fn,
    stage_instruction,
    stage_line,
    stage_target,
)

__all__ = [
    "AlignmentSource", "AnnotatedImage", "BuildReport", "DEFAULT_MAX_VERTICES", "DEFAULT_TOLERANCE", "GRID", "InvalidDataError",
    "ORDERS", "ObjectAnnotation", "PROBLEM_KINDS", "STAGES", "STAGE_HEADERS", "STAGE_WORDS", "box_from_mask", "build_qa_dataset",
    "build_stage_dataset", "build_stage_datasets", "fit_stage_target", "format_box", "format_polygon", "instruct_dataset",
    "llava_record_to_row", "load_coco", "load_llava", "load_source", "mask_to_polygons", "normalise_order", "parse_boxes",
    "parse_labelled_boxes", "polygon_area", "polygon_text", "qa_to_row", "rle_counts_to_string", "rle_decode", "rle_encode",
    "rle_string_to_counts", "sequence_length_fn", "simplify_polygon", "single_turn_row", "source_from_scenes", "stage_dataset",
    "stage_instruction", "stage_line", "stage_roles", "stage_target", "synthetic_scenes", "synthetic_source", "to_grid",
]
