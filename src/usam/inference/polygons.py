"""Outlines of masks on pixel corners that rasterise back to exactly the mask.

YOLO-seg takes one polygon per instance and Label Studio's polygon tool one per
connected part; both are traced here, so each reads back pixel for pixel.
"""

from __future__ import annotations

import cv2
import numpy as np


def _boundary_loops(mask: np.ndarray) -> list[np.ndarray]:
    """Closed loops of pixel edges around a mask's regions and holes, (K, 2) x, y corners each.

    Every edge between a mask pixel and a non-mask pixel is walked with the mask on
    its right; where two regions touch only at a corner the walk turns left, so
    diagonal neighbours share a loop (8-connectivity, as the readers' components).
    Only the corners where the walk turns are kept.
    """
    mask = np.asarray(mask, dtype=bool)
    rows, columns = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if not rows.size:
        return []
    top, left = rows[0], columns[0]  # walk the bounding box only: masks are mostly empty
    mask = mask[top : rows[-1] + 1, left : columns[-1] + 1]
    padded = np.pad(mask, 1)
    stride = mask.shape[1] + 1  # vertex (x, y) has id y * stride + x
    starts, directions = [], []
    # direction 0 east, 1 south, 2 west, 3 north; the offsets give each edge's start corner
    for direction, outside, (dx, dy) in (
        (0, padded[:-2, 1:-1], (0, 0)),  # top edge, walked east
        (1, padded[1:-1, 2:], (1, 0)),  # right edge, walked south
        (2, padded[2:, 1:-1], (1, 1)),  # bottom edge, walked west
        (3, padded[1:-1, :-2], (0, 1)),  # left edge, walked north
    ):
        rows, columns = np.nonzero(mask & ~outside)
        starts.append((rows + dy) * stride + columns + dx)
        directions.append(np.full(len(rows), direction))
    start, direction = np.concatenate(starts), np.concatenate(directions)
    end = start + np.array([1, stride, -1, -stride])[direction]
    order = np.argsort(start, kind="stable")
    first = np.searchsorted(start[order], end)
    following = order[first]
    other = order[np.minimum(first + 1, len(order) - 1)]
    saddle = start[other] == end  # a second edge leaves the corner
    turn_left = saddle & (direction[other] == (direction - 1) % 4)
    following = np.where(turn_left, other, following)
    following, seen = following.tolist(), bytearray(len(start))
    loops = []
    for origin in range(len(start)):
        if seen[origin]:
            continue
        edges, edge = [], origin
        while not seen[edge]:
            seen[edge] = 1
            edges.append(edge)
            edge = following[edge]
        edges = np.array(edges)
        corners = edges[direction[edges] != direction[np.roll(edges, 1)]]
        x, y = start[corners] % stride + left, start[corners] // stride + top
        loops.append(np.stack([x, y], axis=1))
    return loops


def _area(loop: np.ndarray) -> float:
    """Shoelace area; positive for the outside of a region, negative for a hole."""
    x, y = loop[:, 0].astype(np.float64), loop[:, 1].astype(np.float64)
    return float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y)) / 2


def polygon_of(mask: np.ndarray) -> np.ndarray:
    """One closed outline of a whole mask, (P, 2) x, y on pixel corners.

    Corners, not pixel centres: in COCO's convention (which the YOLO-seg reader
    rasterises with) pixel (r, c) spans [c, c + 1) x [r, r + 1), so an outline
    through the centres would lose half a pixel all round. YOLO-seg takes one
    polygon an instance, so every other region and hole is joined to the largest
    region by a bridge walked there and back: under the even-odd rule the two
    passes cancel, and the polygon rasterises back to exactly the mask.
    """
    loops = sorted(_boundary_loops(mask), key=lambda loop: -abs(_area(loop)))
    if not loops:
        return np.zeros((0, 2))
    outline = loops[0]
    detours: dict[int, list[np.ndarray]] = {}  # outline vertex -> loops entered from it
    for loop in loops[1:]:
        distance = ((outline[:, None, :] - loop[None, :, :]) ** 2).sum(-1)
        at, entry = np.unravel_index(distance.argmin(), distance.shape)
        around = np.roll(loop, -entry, axis=0)
        detours.setdefault(int(at), []).append(np.concatenate([around, around[:1]]))
    points = []
    for index, vertex in enumerate(outline):
        points.append(vertex[None])
        for detour in detours.get(index, []):
            points += [detour, vertex[None]]
    return np.concatenate(points).astype(np.float64)


def part_polygons(mask: np.ndarray) -> list[np.ndarray]:
    """One outline per 8-connected part, its holes bridged in: what a person edits in a
    polygon tool, each still exact."""
    count, parts = cv2.connectedComponents(np.asarray(mask, dtype=np.uint8), connectivity=8)
    return [polygon_of(parts == part) for part in range(1, count)]
