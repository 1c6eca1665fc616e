"""PNG renderings of evaluation results: image / ground truth / prediction panels, sweep maps.

Labels are drawn in the PASCAL VOC palette (label 0 background, ``i + 1`` class
``i``, 255 void in VOC's cream), so a VOC ground-truth mask looks the way VOC
tools show it. Background stays transparent so the photo shows through; other
labels are blended at ``alpha``. Pillow only: no plotting library is needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from usam.core.labels import IGNORE

_HEADER = 18  # pixels of caption above each panel
_SWATCH = 14
_TEXT = (20, 20, 20)
_PAPER = (255, 255, 255)


def voc_palette(size: int = 256) -> np.ndarray:
    """(size, 3) uint8: VOC's bit-interleaved colour map (the one its PNGs embed)."""
    palette = np.zeros((size, 3), dtype=np.uint8)
    for label in range(size):
        value, shift = label, 7
        while value:
            for channel in range(3):
                palette[label, channel] |= ((value >> channel) & 1) << shift
            value >>= 3
            shift -= 1
    return palette


PALETTE = voc_palette()


def colorize(labels: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 colours of a label map."""
    return PALETTE[np.asarray(labels, dtype=np.int64) % len(PALETTE)]  # repeat past 255


def blend(image: np.ndarray, labels: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """Labels over an RGB image; background pixels keep the image."""
    image = np.asarray(image, dtype=np.float32)
    colours = colorize(labels).astype(np.float32)
    mixed = np.where((labels > 0)[..., None], (1 - alpha) * image + alpha * colours, image)
    return mixed.round().astype(np.uint8)


def _font(size: int = 12) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def legend_strip(labels: Sequence[int], names: Sequence[str], width: int) -> Image.Image:
    """Swatch and name of each label, wrapped into rows that fit ``width``."""
    font = _font()
    entries = []
    for label in labels:
        name = "void" if label == IGNORE else names[label]
        entries.append((label, name, _SWATCH + 4 + int(font.getlength(name)) + 12))
    rows: list[list[tuple[int, str, int]]] = [[]]
    used = 0
    for entry in entries:
        if rows[-1] and used + entry[2] > width:
            rows.append([])
            used = 0
        rows[-1].append(entry)
        used += entry[2]
    strip = Image.new("RGB", (width, 6 + len(rows) * (_SWATCH + 6)), _PAPER)
    draw = ImageDraw.Draw(strip)
    for row_index, row in enumerate(rows):
        x, y = 4, 4 + row_index * (_SWATCH + 6)
        for label, name, span in row:
            colour = tuple(PALETTE[int(label) % len(PALETTE)].tolist())
            draw.rectangle([x, y, x + _SWATCH, y + _SWATCH], fill=colour)
            draw.text((x + _SWATCH + 4, y), name, fill=_TEXT, font=font)
            x += span
    return strip


def overlay_panel(
    image: np.ndarray,
    truth: np.ndarray,
    prediction: np.ndarray,
    class_names: Sequence[str],
    *,
    title: str = "",
    alpha: float = 0.6,
) -> Image.Image:
    """Image, ground truth and prediction side by side, with a legend of the labels shown.

    ``class_names`` include background at index 0 (label values index it directly).
    """
    truth = np.asarray(truth, dtype=np.uint8)
    prediction = np.asarray(prediction, dtype=np.uint8)
    if truth.shape != prediction.shape:
        raise ValueError(f"ground truth {truth.shape} and prediction {prediction.shape} differ")
    height, width = truth.shape
    image = np.asarray(image, dtype=np.uint8)
    if image.shape[:2] != truth.shape:
        raise ValueError(
            f"image is {image.shape[1]}x{image.shape[0]} but its masks are {width}x{height}"
        )
    panels = [("image", image), ("ground truth", blend(image, truth, alpha))]
    panels.append(("prediction", blend(image, prediction, alpha)))
    font = _font()
    canvas = Image.new("RGB", (3 * width + 8, height + _HEADER), _PAPER)
    draw = ImageDraw.Draw(canvas)
    for index, (caption, pixels) in enumerate(panels):
        x = index * (width + 4)
        canvas.paste(Image.fromarray(pixels), (x, _HEADER))
        text = f"{title}  {caption}" if title and index == 0 else caption
        draw.text((x + 2, 2), text, fill=_TEXT, font=font)
    shown = sorted((set(np.unique(truth).tolist()) | set(np.unique(prediction).tolist())) - {0})
    legend = legend_strip([0, *shown], class_names, canvas.width)
    sheet = Image.new("RGB", (canvas.width, canvas.height + legend.height), _PAPER)
    sheet.paste(canvas, (0, 0))
    sheet.paste(legend, (0, canvas.height))
    return sheet


def _ramp(value: float) -> tuple[int, int, int]:
    """Dark blue (0) to yellow (1); grey for a missing value."""
    if not np.isfinite(value):
        return (190, 190, 190)
    low, high = np.array([40, 30, 110]), np.array([250, 220, 40])
    return tuple(int(c) for c in (low + (high - low) * float(np.clip(value, 0, 1))).round())


def heatmaps(
    rows: Sequence[float],
    columns: Sequence[float],
    maps: dict[str, np.ndarray],
    *,
    row_name: str,
    column_name: str,
    cell: int = 56,
) -> Image.Image:
    """One annotated heat map per entry of ``maps`` (each ``len(rows) x len(columns)``),
    side by side; colours run from each map's minimum to its maximum."""
    font = _font()
    margin_left, margin_top = 44, 42
    map_width = margin_left + cell * len(columns) + 24
    grid_bottom = margin_top + cell * len(rows)
    sheet = Image.new("RGB", (map_width * len(maps), grid_bottom + 24), _PAPER)
    draw = ImageDraw.Draw(sheet)
    caption = f"rows: {row_name}, columns: {column_name}"
    for index, (name, values) in enumerate(maps.items()):
        values = np.asarray(values, dtype=np.float64)
        if values.shape != (len(rows), len(columns)):
            raise ValueError(f"map '{name}' is {values.shape}, not {(len(rows), len(columns))}")
        finite = values[np.isfinite(values)]
        low, high = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
        spread = high - low if high > low else 1.0
        left = index * map_width
        x0 = left + margin_left
        draw.text((x0, 4), name, fill=_TEXT, font=_font(14))
        draw.text((left + 4, grid_bottom + 6), caption, fill=_TEXT, font=font)
        for c, column in enumerate(columns):
            draw.text((x0 + c * cell + 4, margin_top - 16), f"{column:g}", fill=_TEXT, font=font)
        for r, row in enumerate(rows):
            y = margin_top + r * cell
            draw.text((left + 4, y + cell // 2 - 6), f"{row:g}", fill=_TEXT, font=font)
            for c in range(len(columns)):
                value = values[r, c]
                colour = _ramp((value - low) / spread)
                box = [x0 + c * cell, y, x0 + (c + 1) * cell - 2, y + cell - 2]
                draw.rectangle(box, fill=colour)
                ink = _TEXT if sum(colour) > 380 else _PAPER
                label = f"{value:.3g}" if np.isfinite(value) else "n/a"
                draw.text((box[0] + 4, y + cell // 2 - 6), label, fill=ink, font=font)
    return sheet
