"""Synthetic dermoscopy-like data set: the embedded default for `qgseg demo` and the tests.

Each case is a skin-toned, textured background with one irregular pigmented lesion (sometimes
two parts), colour variation inside (brown, dark brown, blue-grey veil, pigment network,
dots), a fuzzy border, hairs, an illumination gradient and dermoscope vignetting. The
"unlabeled" domain is drawn from a shifted distribution (white balance, contrast, hair
density, optics), like images from another clinic.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from qgseg.errors import InputError, QgsegError

__all__ = ["make_case", "generate", "contact_sheet"]

DOMAINS = ("labeled", "unlabeled")
MIN_SIZE = 16
AREA_RANGE = (0.05, 0.45)  # lesion area as a fraction of the image
_ANGLES = 720  # resolution of the contour radius lookup table

# RGB anchor colours, 0..1.
_SKIN_LIGHT = np.array([0.93, 0.79, 0.71], np.float32)
_SKIN_DARK = np.array([0.76, 0.54, 0.42], np.float32)
_BROWN_LIGHT = np.array([0.66, 0.45, 0.31], np.float32)
_BROWN_DARK = np.array([0.30, 0.18, 0.12], np.float32)
_BLUE_GREY = np.array([0.42, 0.45, 0.53], np.float32)
_DOT = np.array([0.17, 0.10, 0.08], np.float32)
_HAIR = np.array([0.13, 0.09, 0.07], np.float32)


@dataclass(frozen=True)
class _Domain:
    """Acquisition settings that differ between the labeled and unlabeled domains."""

    gains: tuple[float, float, float]  # mean white-balance gain per RGB channel
    gain_jitter: float
    contrast: tuple[float, float]  # uniform range
    brightness: tuple[float, float]
    hair_rate: float  # mean number of hairs (Poisson)
    p_no_hair: float
    p_low_contrast: float
    p_fov_circle: float  # hard circular dermoscope field of view
    vignette: tuple[float, float]
    blur_sigma: tuple[float, float]  # optics blur in pixels at 128 px


_DOMAIN_SETTINGS = {
    # Warm, PH2-like acquisition.
    "labeled": _Domain(
        gains=(1.04, 1.00, 0.93), gain_jitter=0.03, contrast=(0.95, 1.15),
        brightness=(-0.03, 0.03), hair_rate=2.5, p_no_hair=0.35, p_low_contrast=0.2,
        p_fov_circle=0.25, vignette=(0.25, 0.65), blur_sigma=(0.3, 0.7),
    ),
    # Cooler (blue/magenta) cast, flatter contrast, hairier and softer, like another clinic.
    "unlabeled": _Domain(
        gains=(0.92, 0.97, 1.10), gain_jitter=0.03, contrast=(0.70, 0.88),
        brightness=(0.0, 0.06), hair_rate=7.0, p_no_hair=0.08, p_low_contrast=0.3,
        p_fov_circle=0.45, vignette=(0.4, 0.8), blur_sigma=(0.6, 1.1),
    ),
}


def _domain_settings(domain: str) -> _Domain:
    if domain not in _DOMAIN_SETTINGS:
        raise InputError(f"domain: expected one of {', '.join(DOMAINS)}, got {domain!r}")
    return _DOMAIN_SETTINGS[domain]


def _noise(rng: np.random.Generator, size: int, cells: int, octaves: int = 1) -> np.ndarray:
    """Smooth zero-mean, unit-std noise (size, size) float32 from upsampled random grids."""
    out = np.zeros((size, size), np.float32)
    for o in range(octaves):
        n = max(2, int(cells * 2**o))
        grid = rng.standard_normal((n + 1, n + 1)).astype(np.float32)
        out += 0.5**o * cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)
    sub = out[::3, ::3]  # statistics on a subsample are plenty and much cheaper
    return (out - sub.mean()) / (sub.std() + 1e-6)


def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1, 1] (x, y), each (size, size) float32."""
    t = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    return np.meshgrid(t, t)


def _star_distance(rng: np.random.Generator, x: np.ndarray, y: np.ndarray,
                   cx: float, cy: float) -> np.ndarray:
    """Normalised distance to a random star-shaped, anisotropic contour centred at (cx, cy)."""
    dx, dy = x - cx, y - cy
    rot = rng.uniform(0, math.pi)
    aspect = rng.uniform(1.0, 1.6)
    u = dx * math.cos(rot) + dy * math.sin(rot)
    v = (-dx * math.sin(rot) + dy * math.cos(rot)) * aspect
    rho, theta = cv2.cartToPolar(u, v)  # theta in [0, 2 pi)
    table = np.linspace(0, 2 * math.pi, _ANGLES, endpoint=False)
    radius = np.ones(_ANGLES)
    for k in range(2, 9):
        amp = rng.uniform(0.0, 0.22) / k**0.6
        radius += amp * np.cos(k * table + rng.uniform(0, 2 * math.pi))
    radius = np.maximum(radius, 0.35).astype(np.float32)
    idx = (theta * (_ANGLES / (2 * math.pi))).astype(np.int32) % _ANGLES
    return rho / radius[idx]


def _lesion_field(rng: np.random.Generator, size: int, x: np.ndarray, y: np.ndarray
                  ) -> np.ndarray:
    """A field whose sub-level sets are irregular, blobby lesions (lower = more inside)."""
    if rng.random() < 0.75:
        cx, cy = (float(v) for v in rng.normal(0.0, 0.12, 2).clip(-0.3, 0.3))
    else:
        cx, cy = (float(v) for v in rng.uniform(-0.5, 0.5, 2))
    d = _star_distance(rng, x, y, cx, cy)
    if rng.random() < 0.25:  # a second part, touching or separate
        ang = rng.uniform(0, 2 * math.pi)
        dist = rng.uniform(0.35, 0.7)
        cx2 = float(np.clip(cx + dist * math.cos(ang), -0.7, 0.7))
        cy2 = float(np.clip(cy + dist * math.sin(ang), -0.7, 0.7))
        d = np.minimum(d, _star_distance(rng, x, y, cx2, cy2) / rng.uniform(0.45, 0.8))
    wobble = rng.uniform(0.05, 0.16)
    return d + wobble * _noise(rng, size, int(rng.integers(3, 7)), octaves=2)


def _largest_parts(mask: np.ndarray) -> np.ndarray:
    """Keep components at least 10% of the largest one: no speckle islands in the truth."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n <= 2:
        return mask
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = np.zeros(n, bool)
    keep[1:] = areas >= 0.1 * areas.max()
    return keep[labels]


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill background regions that do not touch the image border."""
    inv = (~mask).astype(np.uint8)
    n, labels = cv2.connectedComponents(inv, connectivity=4)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    outside = np.isin(labels, border[border > 0])
    return mask | (~outside & (inv > 0))


def _hair_layer(rng: np.random.Generator, size: int, n_hairs: int) -> np.ndarray:
    """Alpha (size, size) float32 of thin, dark, curved hairs (quadratic Bezier curves)."""
    canvas = np.zeros((size, size), np.uint8)
    t = np.linspace(0.0, 1.0, 24, dtype=np.float32)[:, None]
    scale = size / 128.0
    for _ in range(n_hairs):
        p0 = rng.uniform(-0.1, 1.1, 2) * size
        ang = rng.uniform(0, 2 * math.pi)
        length = rng.uniform(0.4, 1.3) * size
        p2 = p0 + length * np.array([math.cos(ang), math.sin(ang)])
        normal = np.array([-math.sin(ang), math.cos(ang)])
        p1 = (p0 + p2) / 2 + normal * rng.uniform(-0.3, 0.3) * length
        pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
        pts = np.round(pts * 16).astype(np.int32)  # 4 fractional bits (shift=4)
        thickness = max(1, int(round(scale * rng.choice([1, 1, 1, 2]))))
        shade = int(rng.uniform(150, 255))
        cv2.polylines(canvas, [pts], False, shade, thickness, cv2.LINE_AA, shift=4)
    return canvas.astype(np.float32) / 255.0


def _mix(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Per-pixel blend a -> b with weight w (H, W); a and b are (H, W, 3) images or RGB colours."""
    return a + (b - a) * w[..., None]


def _lerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    """Blend of two RGB colours (float32)."""
    return (a + (b - a) * np.float32(t)).astype(np.float32)


def _skin(rng: np.random.Generator, size: int) -> np.ndarray:
    """Skin (size, size, 3) float32: per-case tone, mottling, erythema, fine pore texture."""
    skin_col = _lerp(_SKIN_LIGHT, _SKIN_DARK, rng.uniform(0, 1))
    skin_col = skin_col + rng.normal(0, 0.02, 3).astype(np.float32)
    mottle = _noise(rng, size, int(rng.integers(3, 6)), octaves=3)
    redness = _noise(rng, size, int(rng.integers(2, 5)), octaves=2)
    pores = _noise(rng, size, max(4, size // 4))
    lum = 1.0 + rng.uniform(0.03, 0.07) * mottle + rng.uniform(0.01, 0.03) * pores
    skin = skin_col[None, None] * lum[..., None]
    skin[..., 1:] *= (1.0 - rng.uniform(0.0, 0.06) * np.clip(redness, 0, None))[..., None]
    return skin


def _lesion_shape(rng: np.random.Generator, size: int, x: np.ndarray, y: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mask bool, fuzzy alpha float32, depth 0 at the border -> 1 at the core)."""
    px = size / 128.0
    field = _lesion_field(rng, size, x, y)
    # Threshold at the quantile that gives the target area, so the area range is exact.
    area = rng.uniform(AREA_RANGE[0] + 0.01, AREA_RANGE[1] - 0.04)
    k = int(area * size * size)
    thr = float(np.partition(field.ravel(), k)[k])
    mask = _fill_holes(_largest_parts(field < thr))
    soft = rng.uniform(0.02, 0.08)  # border fuzziness, in lesion radii
    alpha = 1.0 / (1.0 + np.exp(-np.clip((thr - field) / soft, -30, 30)))
    # Islands removed from the truth must not stay visible as pigment either.
    keep_zone = cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8),
                           iterations=max(1, int(round(3 * px)))).astype(np.float32)
    alpha *= cv2.GaussianBlur(keep_zone, (0, 0), 1.5 * px)
    alpha = cv2.GaussianBlur(alpha, (0, 0), rng.uniform(0.5, 2.5) * px)
    depth = np.clip((thr - field) / max(thr - float(field.min()), 1e-3), 0, 1)
    return mask, alpha, depth


def _lesion_colour(rng: np.random.Generator, size: int, depth: np.ndarray, low_contrast: bool
                   ) -> np.ndarray:
    """Lesion colours (size, size, 3): light -> dark brown, blue-grey veil, network, dots."""
    px = size / 128.0
    tone = rng.uniform(0.0, 0.5) if low_contrast else rng.uniform(0.1, 1.0)
    light = _lerp(_BROWN_LIGHT, _BROWN_DARK, tone * 0.5)
    dark = _lerp(_BROWN_LIGHT, _BROWN_DARK, 0.4 + 0.6 * tone)
    light = light + rng.normal(0, 0.03, 3).astype(np.float32)
    blotch = _noise(rng, size, int(rng.integers(4, 9)), octaves=2)
    darkness = np.clip(0.35 + 0.25 * blotch + rng.uniform(0.2, 0.7) * depth, 0, 1)
    lesion = _mix(light, dark, darkness)
    if rng.random() < 0.35:
        veil = _noise(rng, size, int(rng.integers(3, 6)))
        veil = np.clip((veil - rng.uniform(0.0, 0.8)) * 2.0, 0, 1) * np.clip(depth * 3, 0, 1)
        lesion = _mix(lesion, _BLUE_GREY, rng.uniform(0.4, 0.8) * veil)
    if rng.random() < 0.5:
        # Zero crossings of fine noise form a mesh of closed loops: a pigment network,
        # strongest towards the periphery as in reticular naevi.
        ridges = np.abs(_noise(rng, size, max(8, size // 5)))
        network = np.clip(1.0 - ridges / 0.3, 0, 1) * (1.0 - 0.6 * depth)
        lesion *= (1.0 - rng.uniform(0.15, 0.35) * network)[..., None]
    if rng.random() < 0.6:
        cand = np.flatnonzero(depth > 0.1)
        if cand.size:
            dots = np.zeros(size * size, np.float32)
            n_dots = max(2, int(round(rng.integers(5, 40) * px)))
            dots[rng.choice(cand, n_dots)] = 1.0
            dots = cv2.GaussianBlur(dots.reshape(size, size), (0, 0), rng.uniform(0.6, 1.2) * px)
            dots = np.clip(dots / (dots.max() + 1e-6) * 1.5, 0, 1)
            dot_col = _lerp(_DOT, _BROWN_DARK, rng.uniform(0.0, 0.6))
            lesion = _mix(lesion, dot_col, rng.uniform(0.5, 0.9) * dots)
    return lesion


def _optics(rng: np.random.Generator, img: np.ndarray, x: np.ndarray, y: np.ndarray,
            dom: _Domain) -> np.ndarray:
    """Illumination gradient, vignetting, optional hard circular field of view, blur."""
    px = img.shape[0] / 128.0
    ang = rng.uniform(0, 2 * math.pi)
    light_field = 1.0 + rng.uniform(0.0, 0.18) * (x * math.cos(ang) + y * math.sin(ang))
    r = np.sqrt(x * x + y * y)
    r0 = rng.uniform(0.55, 0.85)
    ramp = np.clip((r - r0) / (math.sqrt(2.0) - r0), 0, 1)
    light_field *= 1.0 - rng.uniform(*dom.vignette) * ramp**1.5
    if rng.random() < dom.p_fov_circle:
        radius = rng.uniform(1.0, 1.3)
        light_field *= 1.0 - 0.92 / (1.0 + np.exp(-np.clip((r - radius) / 0.025, -30, 30)))
    img = img * light_field[..., None]
    return cv2.GaussianBlur(img, (0, 0), rng.uniform(*dom.blur_sigma) * px)


def _acquire(rng: np.random.Generator, img: np.ndarray, dom: _Domain) -> np.ndarray:
    """Contrast, brightness, white balance and sensor noise; returns uint8 RGB."""
    gains = np.array(dom.gains, np.float32) + rng.normal(0, dom.gain_jitter, 3).astype(np.float32)
    contrast = rng.uniform(*dom.contrast)
    offset = 0.5 - 0.5 * contrast + rng.uniform(*dom.brightness)
    img = (img * contrast + offset) * (gains * 255.0)
    # Uniform sensor noise (same std as the Gaussian it stands for): several times cheaper.
    noise = rng.random(img.shape, np.float32) - 0.5
    img += noise * (rng.uniform(0.002, 0.008) * 255.0 * math.sqrt(12.0))
    img += 0.5  # round half up on the truncating cast below
    np.clip(img, 0, 255, out=img)
    return img.astype(np.uint8)


def make_case(rng: np.random.Generator, size: int, domain: str = "labeled"
              ) -> tuple[np.ndarray, np.ndarray]:
    """One (image uint8 (size,size,3) RGB, mask uint8 (size,size) with values {0,255})."""
    if size < MIN_SIZE:
        raise InputError(f"size: expected at least {MIN_SIZE} pixels, got {size}")
    dom = _domain_settings(domain)
    x, y = _coords(size)
    skin = _skin(rng, size)
    mask, alpha, depth = _lesion_shape(rng, size, x, y)
    low_contrast = rng.random() < dom.p_low_contrast
    lesion = _lesion_colour(rng, size, depth, low_contrast)
    opacity = rng.uniform(0.3, 0.5) if low_contrast else rng.uniform(0.7, 0.95)
    img = _mix(skin, lesion, opacity * alpha)
    # Hairs lie on top of skin and lesion alike.
    n_hairs = 0 if rng.random() < dom.p_no_hair else int(rng.poisson(dom.hair_rate))
    if n_hairs:
        hair_col = _HAIR * rng.uniform(0.6, 1.6) + rng.normal(0, 0.02, 3).astype(np.float32)
        img = _mix(img, hair_col, 0.9 * _hair_layer(rng, size, n_hairs))
    img = _optics(rng, img, x, y, dom)
    return _acquire(rng, img, dom), mask.astype(np.uint8) * 255


def _case_rng(seed: int, domain: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), DOMAINS.index(domain), int(index)])


def _write_png(path: Path, array: np.ndarray) -> None:
    bgr = array[..., ::-1] if array.ndim == 3 else array
    if not cv2.imwrite(str(path), np.ascontiguousarray(bgr)):
        raise QgsegError(f"{path}: could not write PNG")


def _prepare_dir(path: Path, pattern: re.Pattern[str], wanted: set[str]) -> None:
    """Create `path`; delete our own files from an earlier, larger run so counts stay true."""
    path.mkdir(parents=True, exist_ok=True)
    for f in path.iterdir():
        if f.is_file() and pattern.fullmatch(f.name) and f.name not in wanted:
            f.unlink()


def generate(out: Path | str, n_labeled: int = 60, n_unlabeled: int = 120, size: int = 128,
             seed: int = 0) -> dict:
    """Write out/labeled/images/<stem>.png, out/labeled/masks/<stem>.png (stem like case_000),
    out/unlabeled/images/<stem>.png (like u_0000).

    Returns {"labeled": n, "unlabeled": n, "size": size, "out": str(out)}. Seeded: the same
    arguments give byte-identical files. Each case uses its own rng derived from
    (seed, domain, index), so case i does not depend on the counts. Masks are {0, 255}.
    case_*/u_* PNGs of an earlier run in these folders that this run does not write are
    removed (other files are left alone), so the folders hold exactly this data set.
    """
    if n_labeled < 1:
        raise InputError(f"n_labeled: expected at least 1, got {n_labeled}")
    if n_unlabeled < 0:
        raise InputError(f"n_unlabeled: expected 0 or more, got {n_unlabeled}")
    if size < MIN_SIZE:
        raise InputError(f"size: expected at least {MIN_SIZE} pixels, got {size}")
    if seed < 0:
        raise InputError(f"seed: expected 0 or more, got {seed}")
    out = Path(out)
    lab_stems = [f"case_{i:03d}" for i in range(n_labeled)]
    unl_stems = [f"u_{i:04d}" for i in range(n_unlabeled)]
    lab_names = {f"{s}.png" for s in lab_stems}
    dirs = {
        "img": out / "labeled" / "images",
        "mask": out / "labeled" / "masks",
        "unl": out / "unlabeled" / "images",
    }
    _prepare_dir(dirs["img"], re.compile(r"case_\d+\.png"), lab_names)
    _prepare_dir(dirs["mask"], re.compile(r"case_\d+\.png"), lab_names)
    _prepare_dir(dirs["unl"], re.compile(r"u_\d+\.png"), {f"{s}.png" for s in unl_stems})
    for i, stem in enumerate(lab_stems):
        image, mask = make_case(_case_rng(seed, "labeled", i), size, "labeled")
        _write_png(dirs["img"] / f"{stem}.png", image)
        _write_png(dirs["mask"] / f"{stem}.png", mask)
    for i, stem in enumerate(unl_stems):
        image, _ = make_case(_case_rng(seed, "unlabeled", i), size, "unlabeled")
        _write_png(dirs["unl"] / f"{stem}.png", image)
    return {"labeled": n_labeled, "unlabeled": n_unlabeled, "size": size, "out": str(out)}


def contact_sheet(images: list[np.ndarray], masks: list[np.ndarray] | None, path: Path,
                  cols: int = 8, *, palette: int = 0) -> None:
    """Grid PNG of images, with mask contours drawn in green when masks are given.

    Images are RGB uint8 (H,W,3) or grey (H,W); each tile takes the first image's size.
    `masks` may hold None for images without a mask; any nonzero pixel is foreground.
    `palette` > 0 quantises the sheet to that many colours (2-256): a much smaller file for docs.
    """
    if not images:
        raise InputError("contact_sheet: expected at least one image")
    if masks is not None and len(masks) != len(images):
        raise InputError(f"contact_sheet: expected {len(images)} masks, got {len(masks)}")
    h, w = images[0].shape[:2]
    cols = max(1, min(cols, len(images)))
    rows = math.ceil(len(images) / cols)
    pad = 2
    sheet = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, image in enumerate(images):
        tile = np.asarray(image, np.uint8)
        tile = np.repeat(tile[..., None], 3, axis=2) if tile.ndim == 2 else tile[..., :3]
        if tile.shape[:2] != (h, w):
            tile = cv2.resize(tile, (w, h), interpolation=cv2.INTER_AREA)
        tile = tile.copy()  # contours are drawn in place
        if masks is not None and masks[i] is not None:
            m = (np.asarray(masks[i]) > 0).astype(np.uint8)
            if m.shape != (h, w):
                m = cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST)
            contours, _ = cv2.findContours(m, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(tile, contours, -1, (0, 255, 0), 1)
        r, c = divmod(i, cols)
        y0, x0 = pad + r * (h + pad), pad + c * (w + pad)
        sheet[y0:y0 + h, x0:x0 + w] = tile
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if palette:
        if not 2 <= palette <= 256:
            raise InputError(f"palette: expected 0 or 2-256 colours, got {palette}")
        quantised = Image.fromarray(sheet).quantize(palette, method=Image.Quantize.MAXCOVERAGE)
        try:
            quantised.save(path, format="PNG", optimize=True)
        except OSError as exc:
            raise QgsegError(f"{path}: could not write PNG ({exc})") from exc
    else:
        _write_png(path, sheet)
