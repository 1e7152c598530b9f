"""Canny edge maps for the Canny control models, equal to OpenCV's `cv2.Canny(image, low, high)` with its
defaults (3x3 Sobel, L1 magnitude), in numpy: OpenCV is a test dependency only."""

from numbers import Real

import numpy as np
from PIL import Image

from mflux.errors import InvalidArgument

# OpenCV bins the gradient direction in fixed point: tan(22.5 degrees) scaled by 2**15, rounded.
_SHIFT = 15
_TG22 = int(0.4142135623730950488016887242097 * (1 << _SHIFT) + 0.5)

# The neighbour pairs hysteresis links (8-connectivity): right, down-left, down, down-right.
_LINKS = ((0, 1), (1, -1), (1, 0), (1, 1))


def canny(image: Image.Image | np.ndarray, low: float = 50, high: float = 200) -> np.ndarray:
    """The edge map of `image`: a uint8 (H, W) array, 255 on edges and 0 elsewhere.

    Equal to OpenCV's `cv2.Canny(np.asarray(image), low, high)` (apertureSize 3, L2gradient False), the
    detector Black Forest Labs' reference and diffusers' examples use:
    - a grayscale image (PIL mode "L", or a uint8 (H, W) array) is one channel;
    - an RGB image (any other PIL mode is converted to RGB, or a uint8 (H, W, 3) array) is not made
      gray first: as OpenCV does, each pixel takes the gradient of its channel of largest |gx| + |gy|;
    - 3x3 Sobel gradients with the border replicated, magnitude |gx| + |gy|;
    - non-maximum suppression along the gradient direction binned at 22.5 and 67.5 degrees;
    - hysteresis: a pixel of magnitude above `high` is an edge, one above `low` is an edge when it
      touches an edge (8-connectivity).
    Thresholds below 0, or low above high (which OpenCV silently swaps), raise InvalidArgument.
    """
    check_thresholds(low, high)
    channels = as_channels(image)  # (C, H, W) int32
    magnitude, dx, dy = gradients(channels)
    candidates = local_maxima(magnitude, dx, dy) & (magnitude > low)
    edges = hysteresis(candidates, candidates & (magnitude > high))
    return np.where(edges, 255, 0).astype(np.uint8)


def check_thresholds(low: float, high: float) -> None:
    for name, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, Real) or not value >= 0:
            raise InvalidArgument(f"Canny threshold {name}={value!r} is not a number >= 0 (e.g. 50,200)")
    if low > high:
        raise InvalidArgument(
            f"Canny thresholds {low},{high}: the low one is above the high one (e.g. 50,200)"
        )


def as_channels(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image if image.mode == "L" else image.convert("RGB"))
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise InvalidArgument(f"canny takes a PIL image or a uint8 array, not {describe(image)}")
    if image.ndim not in (2, 3) or image.shape[2:] not in ((), (1,), (3,)) or 0 in image.shape[:2]:
        raise InvalidArgument(f"canny takes an (H, W) or (H, W, 3) image, not shape {image.shape}")
    image = image.reshape(image.shape[0], image.shape[1], -1)  # (H, W, C)
    return np.moveaxis(image, 2, 0).astype(np.int32)


def describe(value) -> str:
    return f"a {value.dtype} array" if isinstance(value, np.ndarray) else type(value).__name__


def gradients(channels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """3x3 Sobel per channel (border replicated), then per pixel the channel of largest |gx| + |gy|
    (the first one on a tie, as OpenCV does): magnitude, gx, gy, each (H, W) int32."""
    p = np.pad(channels, ((0, 0), (1, 1), (1, 1)), mode="edge")  # (C, H+2, W+2)
    cols = p[:, :, 2:] - p[:, :, :-2]  # (C, H+2, W): horizontal differences
    dx = cols[:, :-2] + 2 * cols[:, 1:-1] + cols[:, 2:]
    rows = p[:, 2:] - p[:, :-2]  # (C, H, W+2): vertical differences
    dy = rows[:, :, :-2] + 2 * rows[:, :, 1:-1] + rows[:, :, 2:]
    magnitude = np.abs(dx) + np.abs(dy)  # (C, H, W)
    best = np.argmax(magnitude, axis=0)[None]  # (1, H, W)
    return tuple(np.take_along_axis(a, best, axis=0)[0] for a in (magnitude, dx, dy))


def local_maxima(magnitude: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Non-maximum suppression exactly as OpenCV's: the direction binned in fixed point; strictly above
    the left (upper) neighbour and at least the right (lower) one, strictly above both on diagonals;
    zero magnitude outside the image."""
    h, w = magnitude.shape
    m = np.pad(magnitude, 1)  # (H+2, W+2), zeros around
    x = np.abs(dx).astype(np.int64)
    y = np.abs(dy).astype(np.int64) << _SHIFT
    tg22x = x * _TG22
    tg67x = tg22x + (x << (_SHIFT + 1))

    def neighbour(di: int, dj) -> np.ndarray:
        # m at (i + di, j + dj); dj may be a per-pixel array of -1/1 for the diagonals
        if isinstance(dj, int):
            return m[1 + di : 1 + di + h, 1 + dj : 1 + dj + w]
        rows = np.arange(h)[:, None] + 1 + di
        return m[rows, np.arange(w)[None, :] + 1 + dj]

    horizontal = (magnitude > neighbour(0, -1)) & (magnitude >= neighbour(0, 1))
    vertical = (magnitude > neighbour(-1, 0)) & (magnitude >= neighbour(1, 0))
    # gx and gy of one sign: the edge runs from top-right to bottom-left, compare top-left and bottom-right
    s = np.where((dx ^ dy) < 0, -1, 1)
    diagonal = (magnitude > neighbour(-1, -s)) & (magnitude > neighbour(1, s))
    return np.where(y < tg22x, horizontal, np.where(y > tg67x, vertical, diagonal))


def hysteresis(candidates: np.ndarray, strong: np.ndarray) -> np.ndarray:
    """The candidates 8-connected to a strong pixel through candidates."""
    h, w = candidates.shape
    where = np.flatnonzero(candidates)
    if where.size == 0:
        return candidates
    index = np.full(h * w, -1, dtype=np.int64)
    index[where] = np.arange(where.size)
    index = index.reshape(h, w)
    a, b = [], []
    for di, dj in _LINKS:
        left = index[: h - di, max(0, -dj) : w - max(0, dj)]
        right = index[di:, max(0, dj) : w - max(0, -dj)]
        both = (left >= 0) & (right >= 0)
        a.append(left[both])
        b.append(right[both])
    roots = components(where.size, np.concatenate(a), np.concatenate(b))
    lit = np.zeros(where.size, dtype=bool)
    lit[roots[strong.ravel()[where]]] = True
    edges = np.zeros(h * w, dtype=bool)
    edges[where[lit[roots]]] = True
    return edges.reshape(h, w)


def components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """For n nodes linked by the pairs (a[k], b[k]), each node's component as its smallest node.

    Shiloach-Vishkin in numpy: hook each tree's root under the smallest root it is linked to, then
    flatten every tree to its root; repeat until no link crosses two trees (a few rounds in practice).
    """
    parent = np.arange(n)
    while True:
        ra, rb = parent[a], parent[b]
        crossing = ra != rb
        if not crossing.any():
            return parent
        np.minimum.at(parent, np.maximum(ra, rb)[crossing], np.minimum(ra, rb)[crossing])
        while True:
            flat = parent[parent]
            if np.array_equal(flat, parent):
                break
            parent = flat
