"""The box format of Astrea's text, ``[x1, y1, x2, y2]`` on a 0-1000 grid: see :mod:`astrea_vlm.geometry`.

Kept so that ``astrea_vlm.eval.boxes`` imports keep working; the code lives in one place.
"""

from ..geometry import GRID, box_iou, format_box, parse_boxes, pixel_to_normalised, to_grid

__all__ = ["GRID", "box_iou", "format_box", "parse_boxes", "pixel_to_normalised", "to_grid"]
