"""Type 1 mask corruptions (seeded) and their Dice targets for training the quality predictor g.

Every operation is a callable ``op(mask, rng) -> mask`` on uint8 (H,W) {0,1} masks. Sizes in
the paper's setup (kernels, radii, shift lengths) are given for 224 px images; here they are scaled by
``sqrt(H*W) / 224`` (kernels stay odd and >= 3). A :class:`Corruptor` draws a category with the
probabilities in :data:`CATEGORIES`, then operations within it; :func:`corrupt_dataset` makes K
samples per case with one independent generator per sample, so a sample does not depend on
which other samples are made with it, in what order or in which worker process.
"""
from __future__ import annotations

import bisect
import functools
import io
import itertools
import math
import random
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
from numpy.random.bit_generator import ISeedSequence

from qgseg.errors import InputError
from qgseg.runs import atomic_write_bytes

if TYPE_CHECKING:
    import pandas as pd

    from qgseg.config import Config
    from qgseg.data import LabeledData
    from qgseg.report import Reporter
    from qgseg.runs import Run

Op = Callable[[np.ndarray, np.random.Generator], np.ndarray]

CATEGORIES: dict[str, float] = {
    "identity": 0.20,
    "single": 0.28,
    "chained": 0.18,
    "cross_image": 0.10,
    "heavy": 0.12,
    "catastrophic": 0.05,
    "blob": 0.07,
}


# ----------------------------------------------------------------------------------------------
# Dice


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice similarity of two binary masks; 1.0 when both are empty."""
    a = np.asarray(a) != 0
    b = np.asarray(b) != 0
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(a & b)) / total


def dice_batch(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-sample Dice of (N,H,W) x (N,H,W) binary masks as (N,) float32; 1.0 where both are empty."""
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape or a.ndim < 1:
        raise ValueError(f"dice_batch: shapes differ or are scalar: {a.shape} vs {b.shape}")
    per = int(np.prod(a.shape[1:]))
    a = (a != 0).reshape(len(a), per)
    b = (b != 0).reshape(len(b), per)
    inter = np.count_nonzero(a & b, axis=1).astype(np.float64)
    total = np.count_nonzero(a, axis=1) + np.count_nonzero(b, axis=1)
    out = np.ones(len(a), np.float64)
    nz = total > 0
    out[nz] = 2.0 * inter[nz] / total[nz]
    return out.astype(np.float32)


def _dice_rows(rows: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Dice of each {0,1} uint8 mask in rows (R,H,W) against one {0,1} uint8 mask gt (H,W), as
    (R,) float32: the values :func:`dice` gives, with gt counted once (np.count_nonzero without
    an axis is several times faster per row than with one)."""
    n_gt = np.count_nonzero(gt)
    out = np.ones(len(rows), np.float32)
    for r, m in enumerate(rows):
        total = np.count_nonzero(m) + n_gt
        if total:
            out[r] = 2.0 * np.count_nonzero(m & gt) / total
    return out


# ----------------------------------------------------------------------------------------------
# lesion-free images (quality.p_lesion_free)


def remove_lesions(images: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """The images with their lesions painted out: (N,H,W,3) uint8 and (N,H,W) ground truth ->
    (N,H,W,3) uint8 where each lesion, grown by a margin (kernel 15 at 224 px), is filled in
    from the surrounding skin (OpenCV's Telea inpainting). Their true masks are empty."""
    images = np.asarray(images)
    masks = np.asarray(masks)
    if images.ndim != 4 or images.shape[-1] != 3 or masks.shape != images.shape[:3]:
        raise ValueError(f"remove_lesions: expected (N,H,W,3) images and (N,H,W) masks, got "
                         f"{images.shape} and {masks.shape}")
    out = np.empty_like(images, dtype=np.uint8)
    for i, (im, m) in enumerate(zip(images, masks)):
        m = _as_mask(m)
        grown = cv2.dilate(m, np.ones((_kernel(15, m),) * 2, np.uint8))
        out[i] = cv2.inpaint(np.ascontiguousarray(im, dtype=np.uint8), grown, _radius(11, m), cv2.INPAINT_TELEA)
    return out


# ----------------------------------------------------------------------------------------------
# helpers


def _as_mask(mask: np.ndarray) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D (H,W), got shape {m.shape}")
    if m.dtype == np.uint8 and m.flags.c_contiguous and m.max(initial=0) <= 1:
        return m
    return np.ascontiguousarray(m != 0, dtype=np.uint8)


def _scale(mask: np.ndarray) -> float:
    h, w = mask.shape
    return float(np.sqrt(h * w)) / 224.0


def _kernel(k224: int, mask: np.ndarray) -> int:
    return max(3, int(round(k224 * _scale(mask))) | 1)


def _radius(r224: float, mask: np.ndarray) -> int:
    return max(1, int(round(r224 * _scale(mask))))


def _centroid(m: np.ndarray) -> tuple[float, float]:
    mo = cv2.moments(m, binaryImage=True)
    if mo["m00"] == 0:
        h, w = m.shape
        return (w - 1) / 2.0, (h - 1) / 2.0
    return mo["m10"] / mo["m00"], mo["m01"] / mo["m00"]


def _warp(m: np.ndarray, mat: np.ndarray) -> np.ndarray:
    """Affine warp of a {0,1} mask; bilinear on 0/255 then threshold gives smooth edges."""
    h, w = m.shape
    out = cv2.warpAffine(m * np.uint8(255), mat, (w, h), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return (out > 127).astype(np.uint8)


def _points(m: np.ndarray) -> np.ndarray | None:
    """All outer-contour points of the mask as (P,1,2) int32, or None when empty."""
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None
    return np.concatenate(contours, axis=0)


def _random_fg(m: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    """n random foreground pixel coordinates as (n,2) (x, y); empty array when none.

    The r-th foreground pixel in raster order for r ~ U{0, count - 1}, found from per-row counts
    instead of listing every foreground pixel (the same pixels, several times faster)."""
    rows = cv2.reduce(m, 1, cv2.REDUCE_SUM, dtype=cv2.CV_32S).ravel()
    cum = np.cumsum(rows)
    total = int(cum[-1]) if len(cum) else 0
    if total == 0:
        return np.empty((0, 2), np.int64)
    pick = rng.integers(0, total, size=n)
    ys = np.searchsorted(cum, pick, side="right")
    xs = [int(np.flatnonzero(m[y])[r - (cum[y] - rows[y])]) for y, r in zip(ys.tolist(), pick.tolist())]
    return np.stack([np.asarray(xs, np.int64), ys.astype(np.int64)], axis=1)


def _random_bg_near(m: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    """n random background pixels near the lesion (its box grown by a quarter of the image)."""
    h, w = m.shape
    bx, by, bw, bh = cv2.boundingRect(m)
    if bw == 0:
        x0, x1, y0, y1 = 0, w - 1, 0, h - 1
    else:
        mx, my = int(0.25 * w), int(0.25 * h)
        x0, x1 = max(0, bx - mx), min(w - 1, bx + bw - 1 + mx)
        y0, y1 = max(0, by - my), min(h - 1, by + bh - 1 + my)
    cx = rng.integers(x0, x1 + 1, size=16 * n)
    cy = rng.integers(y0, y1 + 1, size=16 * n)
    ok = m[cy, cx] == 0
    if ok.sum() < n:  # lesion fills its neighbourhood: take background anywhere
        idx = np.flatnonzero(m == 0)
        if idx.size == 0:
            return np.empty((0, 2), np.int64)
        pick = idx[rng.integers(0, idx.size, size=n)]
        return np.stack([pick % w, pick // w], axis=1)
    return np.stack([cx[ok][:n], cy[ok][:n]], axis=1)


def _discs(m: np.ndarray, centres: np.ndarray, radii: np.ndarray, value: int) -> np.ndarray:
    out = m.copy()
    for (x, y), r in zip(centres, radii):
        cv2.circle(out, (int(x), int(y)), int(r), value, thickness=-1)
    return out


# ----------------------------------------------------------------------------------------------
# operations (sizes are for 224 px and scaled inside)


def _erode(m: np.ndarray, rng: np.random.Generator, k: int) -> np.ndarray:
    m = _as_mask(m)
    s = _kernel(k, m)
    return cv2.erode(m, np.ones((s, s), np.uint8))


def _dilate(m: np.ndarray, rng: np.random.Generator, k: int) -> np.ndarray:
    m = _as_mask(m)
    s = _kernel(k, m)
    return cv2.dilate(m, np.ones((s, s), np.uint8))


def _morph(m: np.ndarray, rng: np.random.Generator, k: int, op: int) -> np.ndarray:
    m = _as_mask(m)
    s = _kernel(k, m)
    return cv2.morphologyEx(m, op, np.ones((s, s), np.uint8))


def _ellipse(m: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    m = _as_mask(m)
    pts = _points(m)
    if pts is None or len(pts) < 5:
        return m.copy()
    (cx, cy), (a, b), ang = cv2.fitEllipse(pts)
    if not np.isfinite([cx, cy, a, b, ang]).all():
        return _convex_hull(m, rng)
    out = np.zeros_like(m)
    cv2.ellipse(out, ((cx, cy), (max(a, 1.0), max(b, 1.0)), ang), 1, thickness=-1)
    return out


def _convex_hull(m: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    m = _as_mask(m)
    pts = _points(m)
    if pts is None:
        return m.copy()
    out = np.zeros_like(m)
    cv2.fillPoly(out, [cv2.convexHull(pts)], 1)
    return out


def _bbox(m: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    m = _as_mask(m)
    x, y, w, h = cv2.boundingRect(m)
    out = np.zeros_like(m)
    out[y:y + h, x:x + w] = 1
    return out


def _polygon(m: np.ndarray, rng: np.random.Generator, sides: int) -> np.ndarray:
    """Polygon through `sides` points evenly spaced along the largest outer contour."""
    m = _as_mask(m)
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return m.copy()
    c = max(contours, key=len)[:, 0, :]
    if len(c) < sides:
        return m.copy()
    start = rng.integers(0, len(c))
    idx = (start + np.round(np.arange(sides) * len(c) / sides).astype(np.int64)) % len(c)
    out = np.zeros_like(m)
    cv2.fillPoly(out, [c[idx].astype(np.int32).reshape(-1, 1, 2)], 1)
    return out


def _jagged(m: np.ndarray, rng: np.random.Generator, k: int) -> np.ndarray:
    """Resample the boundary band (dilation minus erosion) as Bernoulli(0.5) noise."""
    m = _as_mask(m)
    s = _kernel(k, m)
    kern = np.ones((s, s), np.uint8)
    inner = cv2.erode(m, kern)
    band = cv2.dilate(m, kern) - inner
    noise = rng.random(m.shape, dtype=np.float32) < 0.5
    return inner | (band & noise).astype(np.uint8)


def _smooth(m: np.ndarray, rng: np.random.Generator, k: int) -> np.ndarray:
    m = _as_mask(m)
    s = _kernel(k, m)
    blur = cv2.GaussianBlur(m.astype(np.float32), (s, s), 0)
    return (blur >= 0.5).astype(np.uint8)


# Elastic and grid distortions compute exactly what albumentations 2.0's ElasticTransform
# (noise_distribution="uniform") and GridDistortion (normalized) compute, from the same draws of
# the sample's generator, without the library's per-call machinery (parameter dicts, validation,
# target dispatch), which cost more than the arithmetic at these sizes; tests/test_corrupt.py
# checks the equality against albumentations itself. The x and y maps go to cv2.remap as two
# float32 arrays (the same result as albumentations' one two-channel array, written faster).


def _remap(m: np.ndarray, map_x: np.ndarray, map_y: np.ndarray) -> np.ndarray:
    out = cv2.remap(m * np.uint8(255), map_x, map_y, interpolation=cv2.INTER_LINEAR,
                    borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return (out > 127).astype(np.uint8)


@functools.lru_cache(maxsize=32)
def _pixel_grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel x and y coordinates as float64 (1,W) and (H,1) arrays (read-only, shared)."""
    xs = np.arange(w, dtype=np.float64)[None, :]
    ys = np.arange(h, dtype=np.float64)[:, None]
    xs.flags.writeable = ys.flags.writeable = False
    return xs, ys


def _elastic(m: np.ndarray, rng: np.random.Generator, alpha: float, sigma: float) -> np.ndarray:
    """Uniform noise in [-1, 1] per axis, blurred (sigma), times alpha: the displacement field."""
    m = _as_mask(m)
    s = _scale(m)
    alpha, sigma = round(alpha * s, 3), round(max(sigma * s, 1.0), 3)
    h, w = m.shape
    rng.integers(0, 2**63)  # albumentations' Python-random seed: drawn so later draws stay the same
    u = rng.random((2, h, w))  # rng.uniform(-1, 1, size): the same draws and -1 + 2 * u
    u *= 2.0
    fields = np.empty((2, h, w), np.float32)
    np.subtract(u, 1.0, out=fields, casting="unsafe")  # float64, then float32 as .astype
    flat = fields.reshape(2 * h, w)  # both fields blurred as one image, as albumentations does
    cv2.GaussianBlur(flat, (0, 0), sigma, dst=flat, borderType=cv2.BORDER_REPLICATE)
    fields *= alpha
    xs, ys = _pixel_grid(h, w)
    map_x, map_y = np.empty((h, w), np.float32), np.empty((h, w), np.float32)
    np.add(xs, fields[0], out=map_x, casting="unsafe")  # float64 sum, then float32
    np.add(ys, fields[1], out=map_y, casting="unsafe")
    return _remap(m, map_x, map_y)


def _grid_axis(n: int, steps: int, stretch: list[float]) -> np.ndarray:
    """One axis of the distorted grid: `steps` cells whose lengths are scaled by `stretch`
    (steps + 1 factors, the last for the remainder), normalised to span the image; within a cell
    positions run linearly (np.linspace's arithmetic, for all cells at once). Positions past the
    last cell stay 0, as in albumentations."""
    step = n // steps
    stretch = list(stretch)
    stretch[-1] *= (min(n, (steps + 1) * step) - steps * step) / step
    factors = np.array(stretch) * ((n / math.floor(n / steps)) / np.sum(stretch))
    ends = np.cumsum(step * factors)  # sequential sums, as the running prev + step * f
    starts = np.concatenate([[0.0], ends[:-1]])
    covered = min(n, (steps + 1) * step)
    pos = np.arange(covered)
    cell = pos // step
    k = pos - cell * step  # index within the cell
    num = np.minimum(cell * step + step, n) - cell * step  # cell lengths (>= 1)
    div = np.maximum(num - 1, 1)
    y = k * ((ends - starts)[cell] / div) + starts[cell]
    last = (k == num - 1) & (num > 1)
    y[last] = ends[cell[last]]
    out = np.zeros(n, np.float32)
    out[:covered] = y
    return out


def _grid(m: np.ndarray, rng: np.random.Generator, steps: int, limit: float) -> np.ndarray:
    """Grid distortion: each of `steps` cells per axis stretched by 1 + U(-limit, limit)."""
    m = _as_mask(m)
    h, w = m.shape
    steps = max(1, min(steps, min(h, w) // 2))
    pr = random.Random(int(rng.integers(0, 2**63)))
    sx = [1 + pr.uniform(-limit, limit) for _ in range(steps + 1)]
    sy = [1 + pr.uniform(-limit, limit) for _ in range(steps + 1)]
    map_x = np.ascontiguousarray(np.broadcast_to(_grid_axis(w, steps, sx)[None, :], (h, w)))
    map_y = np.ascontiguousarray(np.broadcast_to(_grid_axis(h, steps, sy)[:, None], (h, w)))
    return _remap(m, map_x, map_y)


def _holes(m: np.ndarray, rng: np.random.Generator, n: int, rmin: float, rmax: float) -> np.ndarray:
    m = _as_mask(m)
    centres = _random_fg(m, rng, n)
    radii = [_radius(r, m) for r in rng.uniform(rmin, rmax, size=len(centres))]
    return _discs(m, centres, np.asarray(radii), 0)


def _islands(m: np.ndarray, rng: np.random.Generator, n: int, rmin: float, rmax: float) -> np.ndarray:
    m = _as_mask(m)
    centres = _random_bg_near(m, rng, n)
    radii = [_radius(r, m) for r in rng.uniform(rmin, rmax, size=len(centres))]
    return _discs(m, centres, np.asarray(radii), 1)


def _holes_islands(m: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _islands(_holes(m, rng, 2, 5, 15), rng, 2, 5, 15)


def _keep_largest(m: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    m = _as_mask(m)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    if n <= 2:
        return m.copy()
    big = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return (labels == big).astype(np.uint8)


def _drop_component(m: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Remove one random connected component (only when there are at least two)."""
    m = _as_mask(m)
    n, labels = cv2.connectedComponents(m, connectivity=8)
    if n <= 2:
        return m.copy()
    drop = int(rng.integers(1, n))
    return ((labels != drop) & (m != 0)).astype(np.uint8)


def _rect_dropout(m: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Zero one rectangle (sides 10-30% of the image) centred on a random lesion pixel."""
    m = _as_mask(m)
    c = _random_fg(m, rng, 1)
    if len(c) == 0:
        return m.copy()
    h, w = m.shape
    rw, rh = rng.uniform(0.1, 0.3, size=2) * (w, h)
    x, y = c[0]
    out = m.copy()
    out[max(0, int(y - rh / 2)):int(y + rh / 2) + 1, max(0, int(x - rw / 2)):int(x + rw / 2) + 1] = 0
    return out


def _shift(m: np.ndarray, rng: np.random.Generator, frac: float) -> np.ndarray:
    """Translate by `frac` of the image size in a random direction."""
    m = _as_mask(m)
    h, w = m.shape
    theta = rng.uniform(0, 2 * np.pi)
    dx, dy = int(round(frac * w * np.cos(theta))), int(round(frac * h * np.sin(theta)))
    out = np.zeros_like(m)
    src = m[max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
    out[max(0, dy):max(0, dy) + src.shape[0], max(0, dx):max(0, dx) + src.shape[1]] = src
    return out


def _scale_op(m: np.ndarray, rng: np.random.Generator, lo: float, hi: float) -> np.ndarray:
    m = _as_mask(m)
    mat = cv2.getRotationMatrix2D(_centroid(m), 0.0, float(rng.uniform(lo, hi)))
    return _warp(m, mat)


def _rotate(m: np.ndarray, rng: np.random.Generator, deg: float) -> np.ndarray:
    m = _as_mask(m)
    mat = cv2.getRotationMatrix2D(_centroid(m), float(deg * rng.choice((-1.0, 1.0))), 1.0)
    return _warp(m, mat)


def _affine(m: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    m = _as_mask(m)
    h, w = m.shape
    mat = cv2.getRotationMatrix2D(_centroid(m), float(rng.uniform(-15, 15)), float(rng.uniform(0.9, 1.1)))
    mat[:, 2] += rng.uniform(-0.1, 0.1, size=2) * (w, h)
    return _warp(m, mat)


def _lesion_geometry(m: np.ndarray, rng: np.random.Generator) -> tuple[float, float, float, np.ndarray]:
    """Centre (x, y), area and 2x2 covariance of the lesion; a random small blob when empty."""
    h, w = m.shape
    mo = cv2.moments(m, binaryImage=True)
    if mo["m00"] == 0:
        r = rng.uniform(0.05, 0.15) * np.sqrt(h * w)
        cx, cy = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h
        return cx, cy, np.pi * r * r, np.eye(2) * (r * r / 4)
    cx, cy = mo["m10"] / mo["m00"], mo["m01"] / mo["m00"]
    cov = np.array([[mo["mu20"], mo["mu11"]], [mo["mu11"], mo["mu02"]]]) / mo["m00"]
    return cx, cy, mo["m00"], cov + np.eye(2) * 0.25


def _gauss_blob(m: np.ndarray, rng: np.random.Generator, size: float) -> np.ndarray:
    """A blob of `size` times the lesion's extent around it: a Gaussian shaped like the lesion
    (moments), its axes jittered, bent by low-frequency noise, thresholded to size**2 x area."""
    m = _as_mask(m)
    h, w = m.shape
    cx, cy, area, cov = _lesion_geometry(m, rng)
    evals, evecs = np.linalg.eigh(cov)
    sd = np.sqrt(np.maximum(evals, 0.25)) * size * rng.uniform(0.85, 1.15, size=2)
    rot = float(rng.uniform(-0.3, 0.3))
    c, s = np.cos(rot), np.sin(rot)
    evecs = evecs @ np.array([[c, -s], [s, c]])
    cx += rng.normal(0, 0.15) * sd.max()
    cy += rng.normal(0, 0.15) * sd.max()
    xs = np.arange(w, dtype=np.float32) - np.float32(cx)
    ys = np.arange(h, dtype=np.float32)[:, None] - np.float32(cy)
    # u = (xs * e00 + ys * e10) / sd0 etc., in place (the same float64 operations, in the same order)
    u = np.add(xs * evecs[0, 0], ys * evecs[1, 0])
    u /= sd[0]
    v = np.add(xs * evecs[0, 1], ys * evecs[1, 1])
    v /= sd[1]
    # log of the Gaussian plus smooth noise: the noise bends the boundary by a fraction of the
    # radius without creating far-away islands where the Gaussian itself is ~0
    noise = cv2.resize(rng.normal(0, 1, (6, 6)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    u *= u
    v *= v
    u += v
    u *= -0.5
    noise *= 0.4  # float32, as 0.4 * noise
    u += noise
    field = u  # -0.5 * (u * u + v * v) + 0.4 * noise
    target = int(min(h * w, round(area * size * size)))
    if target <= 0:
        return np.zeros_like(m)
    if target >= h * w:
        return np.ones_like(m)
    return (field >= _kth_smallest(field.ravel(), h * w - target)).astype(np.uint8)


def _kth_smallest(x: np.ndarray, kth: int) -> float:
    """``np.partition(x, kth)[kth]`` of a 1-D array, partitioning only the values between two
    bounds read from a strided sample (a few hundred values instead of all); the whole array when
    the bounds miss, which the counts below detect, so the result is always the same."""
    n = x.size
    sub = x[::8]
    s = sub.size
    if n < 1024:
        return np.partition(x, kth)[kth]
    q = kth * s // n  # the kth value's expected rank in the sample
    margin = 16 + int(4 * math.sqrt(s * 0.25))  # > 4 standard deviations of that rank
    lo_j, hi_j = max(0, q - margin), min(s - 1, q + margin)
    lo, hi = np.partition(sub, (lo_j, hi_j))[[lo_j, hi_j]]
    below = int(np.count_nonzero(x < lo))
    cand = x[(x >= lo) & (x <= hi)]
    if below <= kth < below + cand.size:  # then it is the (kth - below)th smallest between the bounds
        return np.partition(cand, kth - below)[kth - below]
    return np.partition(x, kth)[kth]


def _circle_blob(m: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A disc of about the lesion's area, centred near its centroid."""
    m = _as_mask(m)
    cx, cy, area, _ = _lesion_geometry(m, rng)
    r = np.sqrt(area / np.pi)
    radius = max(1, int(round(r * rng.uniform(0.8, 1.25))))
    cx, cy = cx + rng.normal(0, 0.15 * r), cy + rng.normal(0, 0.15 * r)
    out = np.zeros_like(m)
    cv2.circle(out, (int(round(cx)), int(round(cy))), radius, 1, thickness=-1)
    return out


def _invert(m: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return 1 - _as_mask(m)


def _empty(m: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.zeros(np.shape(m), np.uint8)


def _full(m: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.ones(np.shape(m), np.uint8)


def _random_density(m: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return (rng.random(np.shape(m), dtype=np.float32) < 0.5).astype(np.uint8)


P = functools.partial

# name -> (op, weight within its category)
_SINGLE: dict[str, tuple[Op, float]] = {
    "erode_k5": (P(_erode, k=5), 1.0),
    "erode_k7": (P(_erode, k=7), 1.0),
    "erode_k9": (P(_erode, k=9), 0.8),
    "dilate_k5": (P(_dilate, k=5), 1.0),
    "dilate_k7": (P(_dilate, k=7), 1.0),
    "dilate_k9": (P(_dilate, k=9), 0.8),
    "opening_k5": (P(_morph, k=5, op=cv2.MORPH_OPEN), 0.5),
    "closing_k5": (P(_morph, k=5, op=cv2.MORPH_CLOSE), 0.5),
    "ellipse": (_ellipse, 0.5),
    "convex_hull": (_convex_hull, 0.5),
    "bbox": (_bbox, 0.5),
    "polygon_3": (P(_polygon, sides=3), 0.5),
    "polygon_5": (P(_polygon, sides=5), 0.5),
    "polygon_8": (P(_polygon, sides=8), 0.5),
    "jagged_k3": (P(_jagged, k=3), 0.5),
    "jagged_k5": (P(_jagged, k=5), 0.5),
    "smooth_g11": (P(_smooth, k=11), 0.5),
    "smooth_g15": (P(_smooth, k=15), 0.5),
    "elastic_light": (P(_elastic, alpha=30, sigma=4), 1.0),
    "elastic_heavy": (P(_elastic, alpha=60, sigma=5), 1.0),
    "grid_light": (P(_grid, steps=5, limit=0.2), 1.0),
    "grid_heavy": (P(_grid, steps=8, limit=0.4), 1.0),
    "holes_small": (P(_holes, n=2, rmin=3, rmax=8), 1.0),
    "holes_large": (P(_holes, n=3, rmin=8, rmax=15), 1.0),
    "islands": (P(_islands, n=2, rmin=3, rmax=8), 1.0),
    "holes_islands": (_holes_islands, 1.0),
    "keep_largest": (_keep_largest, 0.5),
    "drop_component": (_drop_component, 0.5),
    "rect_dropout": (_rect_dropout, 1.0),
    "shift_0.1": (P(_shift, frac=0.1), 1.0),
    "shift_0.2": (P(_shift, frac=0.2), 1.0),
    "shift_0.3": (P(_shift, frac=0.3), 1.0),
    "scale_down": (P(_scale_op, lo=0.75, hi=0.9), 1.0),
    "scale_up": (P(_scale_op, lo=1.1, hi=1.25), 1.0),
    "rotate_15": (P(_rotate, deg=15), 0.5),
    "rotate_30": (P(_rotate, deg=30), 0.5),
    "affine": (_affine, 1.0),
}
_BLOB: dict[str, tuple[Op, float]] = {
    "gauss_blob_1.0": (P(_gauss_blob, size=1.0), 0.5),
    "gauss_blob_1.2": (P(_gauss_blob, size=1.2), 0.5),
    "circle_blob": (_circle_blob, 0.5),
}
_HEAVY: dict[str, tuple[Op, float]] = {
    "heavy_erode": (P(_erode, k=11), 1.0),
    "heavy_dilate": (P(_dilate, k=11), 1.0),
    "heavy_shift": (P(_shift, frac=0.4), 1.0),
    "heavy_scale_down": (P(_scale_op, lo=0.5, hi=0.7), 0.5),
    "heavy_scale_up": (P(_scale_op, lo=1.4, hi=1.6), 0.5),
    "heavy_grid": (P(_grid, steps=12, limit=0.6), 1.0),
    "heavy_holes": (P(_holes, n=5, rmin=10, rmax=20), 1.0),
}
_CATASTROPHIC: dict[str, tuple[Op, float]] = {
    "invert": (_invert, 1.0),
    "empty": (_empty, 0.5),
    "full": (_full, 0.5),
    "random_density": (_random_density, 0.3),
}

OPS: dict[str, Op] = {name: op for table in (_SINGLE, _BLOB, _HEAVY, _CATASTROPHIC)
                      for name, (op, _) in table.items()}

#: Weights of the operations drawn within each category ("single" also draws the blobs, as in
#: the paper's list of single operations; "chained" draws from the single operations without blobs).
WEIGHTS: dict[str, dict[str, float]] = {
    "single": {n: w for n, (_, w) in (_SINGLE | _BLOB).items()},
    "chained": {n: w for n, (_, w) in _SINGLE.items()},
    "heavy": {n: w for n, (_, w) in _HEAVY.items()},
    "catastrophic": {n: w for n, (_, w) in _CATASTROPHIC.items()},
    "blob": {n: w for n, (_, w) in _BLOB.items()},
}


# ----------------------------------------------------------------------------------------------
# sampling


class _Table:
    """Names and cumulative probabilities for fast weighted draws."""

    def __init__(self, weights: dict[str, float]):
        self.names = list(weights)
        p = np.asarray(list(weights.values()), np.float64)
        self.p = p / p.sum()
        cum = np.cumsum(self.p)
        cum[-1] = 1.0
        self.cum = cum.tolist()
        self._p = self.p.tolist()

    def draw(self, rng: np.random.Generator) -> str:
        return self.names[bisect.bisect_right(self.cum, rng.random())]

    def draw_distinct(self, rng: np.random.Generator, n: int) -> list[str]:
        """n distinct names drawn with probabilities p: the draws and the result of
        ``rng.choice(len(names), n, replace=False, p=p)`` (redraw the missing ones from the
        renormalised cumulative sums until n are distinct) in plain Python, which is several
        times faster for a few dozen names."""
        if n > len(self.names):
            raise ValueError(f"draw_distinct: {n} distinct names asked of {len(self.names)}")
        p = list(self._p)
        found: list[int] = []
        while len(found) < n:
            x = rng.random(n - len(found)).tolist()
            for i in found:
                p[i] = 0.0
            cdf = list(itertools.accumulate(p))
            total = cdf[-1]
            cdf = [c / total for c in cdf]
            for v in x:
                i = bisect.bisect_right(cdf, v)
                if i not in found:
                    found.append(i)
        return [self.names[i] for i in found]


_CATEGORY_TABLE = _Table(CATEGORIES)
_OP_TABLES = {cat: _Table(w) for cat, w in WEIGHTS.items()}


class Corruptor:
    """Draws Type 1 corruptions of a fixed set of ground-truth masks."""

    def __init__(self, masks: np.ndarray):
        masks = np.asarray(masks)
        if masks.ndim != 3:
            raise InputError(f"masks: expected an (N,H,W) array, got shape {masks.shape}")
        self.masks = np.ascontiguousarray(masks != 0, dtype=np.uint8)
        n = len(self.masks)
        self.areas = self.masks.reshape(n, -1).sum(axis=1, dtype=np.int64)
        self._n_near = max(1, int(np.ceil(0.2 * (n - 1)))) if n > 1 else 0
        self._partners: dict[int, np.ndarray] = {}

    def partners(self, i: int) -> np.ndarray:
        """Cross-image candidates for case i: the 20% of the other cases closest in mask area
        (ties broken by index), closest first."""
        if i not in self._partners:
            n = len(self.masks)
            key = np.abs(self.areas - self.areas[i]) * n + np.arange(n)  # unique keys: stable ties
            key[i] = np.iinfo(np.int64).max
            near = np.argpartition(key, self._n_near - 1)[:self._n_near]
            self._partners[i] = near[np.argsort(key[near])]
        return self._partners[i]

    def __len__(self) -> int:
        return len(self.masks)

    def sample(self, i: int, rng: np.random.Generator) -> tuple[np.ndarray, str, list[str]]:
        """One corrupted version of masks[i]: (mask, category, op names)."""
        gt = self.masks[i]
        category = _CATEGORY_TABLE.draw(rng)
        if category == "cross_image" and self._n_near == 0:
            category = "single"  # a single case has no other image to borrow from
        if category == "identity":
            return gt.copy(), category, []
        if category == "cross_image":
            partners = self.partners(i)
            j = int(partners[rng.integers(0, len(partners))])
            return self.masks[j].copy(), category, [f"cross_{j}"]
        if category == "chained":
            names = _OP_TABLES["chained"].draw_distinct(rng, int(rng.integers(2, 4)))
        else:
            names = [_OP_TABLES[category].draw(rng)]
        m = gt
        for name in names:
            m = OPS[name](m, rng)
        return m, category, names


# ----------------------------------------------------------------------------------------------
# data set of corrupted masks


@dataclass
class CorruptedSet:
    """K corrupted masks per case with their Dice against the case's ground truth."""

    case: np.ndarray  # (M,) int32 index into the input masks
    masks: np.ndarray  # (M,H,W) uint8 {0,1}
    dice: np.ndarray  # (M,) float32
    category: list[str]
    ops: list[str]  # "+"-joined op names ("" for identity)

    def __len__(self) -> int:
        return len(self.case)

    def index_frame(self, stems: list[str]) -> pd.DataFrame:
        """One row per sample: stem of its case, k (sample number within the case), category,
        ops, dice."""
        import pandas as pd

        if len(self.case) and int(self.case.max()) >= len(stems):
            raise InputError(f"stems: {len(stems)} given but the set refers to case {int(self.case.max())}")
        case = pd.Series(self.case)
        return pd.DataFrame({
            "stem": [stems[c] for c in self.case],
            "k": case.groupby(case).cumcount().to_numpy(),
            "category": list(self.category),
            "ops": list(self.ops),
            "dice": self.dice.astype(np.float32),
        })


class _SeedState(ISeedSequence):
    """A SeedSequence's output computed beforehand (see :func:`_sample_rngs`)."""

    __slots__ = ("state",)

    def __init__(self, state: np.ndarray):
        self.state = state

    def generate_state(self, n_words: int, dtype=np.uint32) -> np.ndarray:
        if n_words != 4 or np.dtype(dtype) != np.uint64:
            raise ValueError("_SeedState only seeds PCG64 (4 uint64 words)")
        return self.state


_U32 = np.uint32
_MASK32 = 0xFFFFFFFF


def _words(n: int) -> list[int]:
    """n as little-endian 32-bit words, as SeedSequence splits an entropy integer."""
    if n == 0:
        return [0]
    out = []
    while n > 0:
        out.append(n & _MASK32)
        n >>= 32
    return out


def _sample_rngs(seed: int, cases: np.ndarray, k: int) -> list[np.random.Generator]:
    """``np.random.default_rng([seed, i, j])`` for every case i in `cases` and j < k, in that
    order, bit for bit: numpy's SeedSequence hashing (pool of 4 words, ``mix_entropy`` and
    ``generate_state(4, uint64)``) done for all samples at once with uint32 array arithmetic,
    then one PCG64 per sample from its 4 words. default_rng costs ~10 us per call, more than
    many corruptions; tests/test_corrupt.py checks the equality."""
    cases = np.asarray(cases, np.int64)
    seed = int(seed)
    if seed < 0 or (len(cases) and (cases.min() < 0 or cases.max() > _MASK32)) or k - 1 > _MASK32:
        return [np.random.default_rng([seed, int(i), j]) for i in cases for j in range(k)]
    cols = [np.full(len(cases) * k, w, _U32) for w in _words(seed)]
    cols += [np.repeat(cases, k).astype(_U32), np.tile(np.arange(k, dtype=np.int64), len(cases)).astype(_U32)]
    hash_a = 0x43B0D7E5  # SeedSequence's INIT_A

    def hashmix(value: np.ndarray) -> np.ndarray:
        nonlocal hash_a
        value = value ^ _U32(hash_a)
        hash_a = (hash_a * 0x931E8875) & _MASK32  # MULT_A
        value = value * _U32(hash_a)
        return value ^ (value >> _U32(16))

    def mix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        r = _U32(0xCA01F9DD) * x - _U32(0x4973F715) * y  # MIX_MULT_L, MIX_MULT_R
        return r ^ (r >> _U32(16))

    zero = np.zeros(len(cols[0]), _U32)
    pool = [hashmix(cols[p] if p < len(cols) else zero) for p in range(4)]
    for src in range(4):
        for dst in range(4):
            if src != dst:
                pool[dst] = mix(pool[dst], hashmix(pool[src]))
    for src in range(4, len(cols)):
        for dst in range(4):
            pool[dst] = mix(pool[dst], hashmix(cols[src]))
    hash_b = 0x8B51F9DD  # INIT_B
    words = np.empty((len(cols[0]), 8), _U32)
    for i in range(8):
        v = pool[i % 4] ^ _U32(hash_b)
        hash_b = (hash_b * 0x58F38DED) & _MASK32  # MULT_B
        v = v * _U32(hash_b)
        words[:, i] = v ^ (v >> _U32(16))
    states = words.astype("<u4").view("<u8").astype(np.uint64)  # (M, 4), as generate_state
    gen, bitgen = np.random.Generator, np.random.PCG64
    return [gen(bitgen(_SeedState(row))) for row in states]


def corrupt_dataset(masks: np.ndarray, k: int, seed: int, weak: np.ndarray | None = None,
                    p_weak: float = 0.05, workers: int = 1, block: int = 64,
                    progress: Callable[[int], None] | None = None, fold: np.ndarray | None = None,
                    p_fold: float = 0.0) -> CorruptedSet:
    """K corrupted masks per input mask.

    Sample j of case i uses its own rng ``np.random.default_rng([seed, i, j])`` (made in bulk by
    :func:`_sample_rngs`), so the result depends neither on order nor on how the work is split:
    cases are corrupted in blocks of `block` cases, in this process (``workers`` <= 1) or in
    `workers` spawned processes. ``weak``: optional (C,N,H,W) uint8 predictions of C weak-model
    checkpoints; with probability ``p_weak`` a sample is instead the prediction of a uniformly
    chosen checkpoint (category "weak", ops "weak_ckpt<c>"). ``fold``: optional (C,N,H,W)
    out-of-fold predictions (row i by models that never trained on case i); with probability
    ``p_fold`` a sample is one of them, uniformly chosen (category "fold", ops "fold_ckpt<c>").
    Without ``fold`` (or with p_fold 0) the draws are exactly those of a set made without it.
    ``progress(n)`` is called after each block with its number of masks.
    """
    if k < 1:
        raise InputError(f"corrupt.k: expected a positive integer, got {k}")
    if not 0.0 <= p_weak <= 1.0:
        raise InputError(f"corrupt.p_weak: expected a probability in [0, 1], got {p_weak}")
    if not 0.0 <= p_fold <= 1.0:
        raise InputError(f"corrupt.p_fold: expected a probability in [0, 1], got {p_fold}")
    if block < 1:
        raise InputError(f"corrupt_dataset: block must be a positive integer, got {block}")
    cor = Corruptor(masks)
    n, h, w = cor.masks.shape
    for name, extra in (("weak", weak), ("fold", fold)):
        if extra is not None:
            shape = np.shape(extra)
            if len(shape) != 4 or shape[1:] != (n, h, w) or shape[0] < 1:
                raise InputError(f"{name}: expected (C,{n},{h},{w}) predictions, got shape {shape}")
    weak = np.asarray(weak) if weak is not None else None
    fold = np.asarray(fold) if fold is not None and p_fold > 0 else None
    jobs = [(seed, k, p_weak, p_fold, a, min(a + block, n)) for a in range(0, n, block)]
    if workers > 1 and len(jobs) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: the caller may hold torch / OpenMP threads that a forked child inherits broken
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_init_worker, initargs=(cor.masks, weak, fold)) as pool:
            parts = []
            for part in pool.map(_worker_block, jobs):
                parts.append(part)
                if progress is not None:
                    progress(len(part[1]))  # masks of one block done
    else:
        parts = []
        for job in jobs:
            parts.append(_corrupt_block(cor, weak, fold, *job))
            if progress is not None:
                progress(len(parts[-1][1]))
    return CorruptedSet(case=np.repeat(np.arange(n, dtype=np.int32), k),
                        masks=np.concatenate([p[0] for p in parts]) if parts else np.empty((0, h, w), np.uint8),
                        dice=np.concatenate([p[1] for p in parts]) if parts else np.empty(0, np.float32),
                        category=[c for p in parts for c in p[2]], ops=[o for p in parts for o in p[3]])


def _corrupt_block(cor: Corruptor, weak: np.ndarray | None, fold: np.ndarray | None, seed: int, k: int,
                   p_weak: float, p_fold: float, start: int, stop: int
                   ) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Samples 0..k-1 of cases start..stop-1: masks, Dice, categories and op names."""
    h, w = cor.masks.shape[1:]
    out = np.empty(((stop - start) * k, h, w), np.uint8)
    d = np.empty(len(out), np.float32)
    category: list[str] = []
    ops: list[str] = []
    rngs = _sample_rngs(seed, np.arange(start, stop), k)
    row = 0
    for i in range(start, stop):
        for _ in range(k):
            rng = rngs[row]
            if fold is not None and rng.random() < p_fold:
                c = int(rng.integers(0, fold.shape[0]))
                out[row] = fold[c, i] != 0
                category.append("fold")
                ops.append(f"fold_ckpt{c}")
            elif weak is not None and rng.random() < p_weak:
                c = int(rng.integers(0, weak.shape[0]))
                out[row] = weak[c, i] != 0
                category.append("weak")
                ops.append(f"weak_ckpt{c}")
            else:
                m, cat, names = cor.sample(i, rng)
                out[row] = m
                category.append(cat)
                ops.append("+".join(names))
            row += 1
        d[row - k:row] = _dice_rows(out[row - k:row], cor.masks[i])
    return out, d, category, ops


_WORKER: dict[str, object] = {}


def _init_worker(masks: np.ndarray, weak: np.ndarray | None, fold: np.ndarray | None = None) -> None:
    _WORKER["cor"], _WORKER["weak"], _WORKER["fold"] = Corruptor(masks), weak, fold


def _worker_block(job: tuple) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    return _corrupt_block(_WORKER["cor"], _WORKER["weak"], _WORKER["fold"], *job)


def _encode(strings: list[str]) -> np.ndarray:
    # bytes ("S") rather than numpy unicode, which takes 4 bytes per character
    return np.array([s.encode("utf-8") for s in strings], dtype=bytes) if strings else np.zeros(0, "S1")


def _decode(arr: np.ndarray) -> list[str]:
    return [b.decode("utf-8") for b in arr.tolist()]


def save_set(cs: CorruptedSet, path: Path) -> None:
    """Write the set as one .npz (bit-packed masks), atomically (runs.atomic_write_bytes)."""
    path = Path(path)
    m, h, w = cs.masks.shape
    packed = np.packbits(cs.masks.reshape(m, -1) != 0, axis=1)
    buf = io.BytesIO()
    np.savez(buf, packed=packed, shape=np.array([m, h, w], np.int64),
             case=cs.case.astype(np.int32), dice=cs.dice.astype(np.float32),
             category=_encode(cs.category), ops=_encode(cs.ops))
    atomic_write_bytes(path, buf.getvalue())


def load_set(path: Path) -> CorruptedSet:
    """Read a set written by :func:`save_set`."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            m, h, w = (int(v) for v in z["shape"])
            masks = np.unpackbits(z["packed"], axis=1, count=h * w).reshape(m, h, w)
            return CorruptedSet(case=z["case"].astype(np.int32), masks=masks,
                                dice=z["dice"].astype(np.float32),
                                category=_decode(z["category"]), ops=_decode(z["ops"]))
    except FileNotFoundError:
        raise InputError(f"{path}: corrupted-mask set not found") from None
    except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise InputError(f"{path}: not a corrupted-mask set written by qgseg ({e})") from None


# ----------------------------------------------------------------------------------------------
# D_Q and the ``qgseg corrupt`` command
#
# D_Q pairs each training image with K corrupted versions of its mask (Type 1 synthetic
# corruptions and, with probability p_weak, Type 2 weak-model predictions, with p_fold out-of-fold
# predictions) and their Dice to the ground truth. Validation and test sets are corruptions of the val and test images with a seed
# fixed by the split seed, so every g trained on the same split is judged on the same masks.

SPLIT_SALT = {"train": 0, "val": 1, "test": 2}
FOREIGN_SALT = 3  # D_Q seed salt of a whole other data set (``qgseg evaluate --data``)


def eval_seed(salt: int, split_seed: int) -> int:
    """Seed of the evaluation corruptions of a split (salt from SPLIT_SALT) or of another data set."""
    return 1_000_003 * salt + split_seed


def build_dq(cfg: Config, data: LabeledData, splits: dict[str, list[str]],
             weak: np.ndarray | None, reporter: Reporter | None = None,
             fold: np.ndarray | None = None) -> dict[str, CorruptedSet]:
    """Corrupted sets for train (K per image, seed = cfg.seed) and val / test (eval_k per image,
    seeds fixed by data.split_seed). ``reporter``: one progress bar over all masks of the three splits.
    Out-of-fold masks (``fold``, (C, N_train, H, W) in the order of the training cases) enter the
    training set only: val and test stay the same for every g."""
    from qgseg.data import positions

    pos = positions(data.stems)
    out = {}
    advance = None
    if reporter is not None:
        total = cfg.corrupt.k * len(splits["train"]) + cfg.corrupt.eval_k * (len(splits["val"]) + len(splits["test"]))
        reporter.start("corrupt", total, unit="masks to draw")
        advance = reporter.advance
    for split in ("train", "val", "test"):
        idx = np.array([pos[s] for s in splits[split]])
        if split == "train":
            k, seed = cfg.corrupt.k, cfg.seed
        else:
            k, seed = cfg.corrupt.eval_k, eval_seed(SPLIT_SALT[split], cfg.data.split_seed)
        w = weak[:, idx] if weak is not None else None
        f = fold if split == "train" else None
        out[split] = corrupt_dataset(data.masks[idx], k, seed, weak=w, p_weak=cfg.corrupt.p_weak, progress=advance,
                                     fold=f, p_fold=cfg.corrupt.p_fold if f is not None else 0.0)
    return out


def dq_summary(cs: CorruptedSet) -> dict[str, Any]:
    """Size, category counts and Dice distribution of a corrupted set (the corrupt summary)."""
    import pandas as pd

    d = cs.dice.astype(float)
    cats = pd.Series(cs.category).value_counts()
    q = np.quantile(d, [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]) if len(d) else np.zeros(7)
    return {
        "masks": int(len(cs)),
        "categories": {k: int(v) for k, v in cats.items()},
        "dice_quantiles": dict(zip(["min", "q10", "q25", "median", "q75", "q90", "max"], map(float, q))),
        "share_below_0.5": float((d < 0.5).mean()) if len(d) else 0.0,
        "share_above_0.9": float((d > 0.9).mean()) if len(d) else 0.0,
    }


def labeled_and_splits(cfg: Config, run: Run) -> tuple[LabeledData, dict[str, list[str]]]:
    """The labeled data and its train / val / test split (written to the run's splits.json)."""
    from qgseg import data as D
    from qgseg.runs import write_json

    data = D.load_labeled(cfg.data.labeled, cfg.data.image_size, cfg.data.cache_dir)
    splits = D.run_splits(data.stems, cfg.data.split_seed, data.root, cfg.data.max_labeled)
    write_json(run.path / "splits.json", splits)
    return data, splits


def load_dq(run: Run, cfg: Config, splits: dict[str, list[str]]) -> dict[str, CorruptedSet]:
    """D_Q from a corrupt run; it must be of the same image size and split."""
    from qgseg.config import load_run_config
    from qgseg.runs import read_json

    rcfg = load_run_config(run.path)
    if rcfg.data.image_size != cfg.data.image_size:
        raise InputError(f"--corrupt {run.path}: made at {rcfg.data.image_size} px, this run uses "
                         f"{cfg.data.image_size} px")
    if read_json(run.path / "splits.json") != splits:
        raise InputError(f"--corrupt {run.path}: made from another train/val/test split "
                         "(different data or data.split_seed)")
    return {s: load_set(run.path / f"dq_{s}.npz") for s in ("train", "val", "test")}


def run_corrupt(loaded, out: Path | str | None = None, resume: bool = False,
                reporter: Reporter | None = None) -> tuple[Run, dict[str, Any]]:
    """Materialise D_Q into a run directory (sets, index table, plots)."""
    import pandas as pd

    from qgseg import data as D
    from qgseg import plots
    from qgseg.report import Reporter
    from qgseg.runs import start_run
    from qgseg.weak import weak_predictions

    run, cfg, _ = start_run("corrupt", loaded, out, resume)
    with run.guard():
        data, splits = labeled_and_splits(cfg, run)
        weak, fold, weak_run = weak_predictions(cfg, data, "weak.run" in loaded.explicit, splits["train"])
        with (reporter or Reporter(enabled=False)) as rep:
            sets = build_dq(cfg, data, splits, weak, rep, fold=fold)
        frames = []
        for split, cs in sets.items():
            save_set(cs, run.path / f"dq_{split}.npz")
            f = cs.index_frame(splits[split])
            f.insert(0, "split", split)
            frames.append(f)
        pd.concat(frames).to_csv(run.path / "index.csv", index=False)
        tr = sets["train"]
        pos = D.positions(data.stems)
        rows = np.array([pos[s] for s in splits["train"]])
        # several cases in every row, one row per category (also those this draw did not produce)
        plots.corruption_examples(data.images[rows], data.masks[rows], tr, run.plots / "examples.png",
                                  categories=list(CATEGORIES) + (["weak"] if weak is not None else []))
        plots.dice_histogram(tr.dice, run.plots / "dice_hist.png", by_category=tr.category)
        summary = {"run": str(run.path), "stage": "corrupt", "image_size": cfg.data.image_size,
                   "k": cfg.corrupt.k, "weak_run": weak_run, **dq_summary(tr)}
        run.write_summary(summary)
        run.set_status("completed")
    return run, summary

