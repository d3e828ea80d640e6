"""Data layer: dataset discovery, validation, splits, a uint8 cache, and batch tensors.

Images are decoded and resized once into uint8 arrays ``(N, S, S, 3)`` and masks into
``(N, S, S)`` with values {0, 1}; the arrays are cached on disk keyed by the file list, sizes,
modification times and the image size, so training never decodes files per step.
"""
from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from qgseg.errors import InputError
from qgseg.runs import atomic_write_bytes

log = logging.getLogger("qgseg")
_SAY_DECODING = 100  # files: from about this many, a first (uncached) load takes long enough to say so

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MASK_SUFFIXES = ("_segmentation", "_lesion", "_mask", "_Segmentation", "_Mask")
SPLITS = ("train", "val", "test")
CACHE_VERSION = 2  # 2: two-level {0, v} masks with v <= 127 are foreground v (were empty)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------
# discovery
# ----------------------------------------------------------------------------------------
@dataclass
class Pair:
    stem: str
    image: Path
    mask: Path


def _images_in(folder: Path, recursive: bool = False) -> list[Path]:
    it = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in it if p.is_file() and p.suffix.lower() in IMAGE_EXTS
                  and not p.name.startswith("."))


def _mask_stem(stem: str) -> str:
    for suf in MASK_SUFFIXES:
        if stem.endswith(suf):
            return stem[: -len(suf)]
    return stem


def _match(images: list[Path], masks: list[Path], root: Path, problems: list[str]) -> list[Pair]:
    by_stem: dict[str, Path] = {}
    for m in masks:
        s = _mask_stem(m.stem)
        if s in by_stem:
            problems.append(f"{m}: two masks for the stem '{s}' ({by_stem[s].name}, {m.name})")
        by_stem[s] = m
    pairs, seen = [], set()
    img_stems: dict[str, Path] = {}
    for im in images:
        if im.stem in img_stems:
            problems.append(f"{im}: two images with the stem '{im.stem}'")
        img_stems[im.stem] = im
        if im.stem in by_stem:
            pairs.append(Pair(im.stem, im, by_stem[im.stem]))
            seen.add(im.stem)
        else:
            problems.append(f"{im}: image without a mask (looked for {im.stem}[{'|'.join(MASK_SUFFIXES[:3])}].*)")
    for s, m in by_stem.items():
        if s not in seen:
            problems.append(f"{m}: mask without an image (no image named {s}.*)")
    return pairs


def _find_dir(root: Path, names: Iterable[str]) -> Path | None:
    lower = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    for n in names:
        if n.lower() in lower:
            return lower[n.lower()]
    return None


def discover_labeled(root: Path | str) -> tuple[str, list[Pair], list[str]]:
    """Find image/mask pairs under ``root``. Returns (layout, pairs, problems)."""
    root = Path(root)
    if not root.exists():
        raise InputError(f"{root}: folder not found")
    if not root.is_dir():
        raise InputError(f"{root}: not a folder")
    problems: list[str] = []
    # PH2 original release: IMDxxx/IMDxxx_Dermoscopic_Image/IMDxxx.bmp + IMDxxx_lesion/IMDxxx_lesion.bmp
    derm = sorted(p for p in root.rglob("*_Dermoscopic_Image") if p.is_dir())
    if derm:
        images, masks = [], []
        for d in derm:
            case = d.name[: -len("_Dermoscopic_Image")]
            images += [p for p in _images_in(d) if p.stem == case]
            lesion = d.parent / f"{case}_lesion"
            if lesion.is_dir():
                masks += _images_in(lesion)
        return "ph2", _match(images, masks, root, problems), problems
    # CVC-ClinicDB: Original/ + Ground Truth/
    orig = _find_dir(root, ["Original"])
    gt = _find_dir(root, ["Ground Truth", "GroundTruth", "Ground_Truth"])
    if orig and gt:
        return "cvc-clinicdb", _match(_images_in(orig), _images_in(gt), root, problems), problems
    # generic / Kvasir-SEG: images/ + masks/
    img_dir = _find_dir(root, ["images", "image", "imgs"])
    mask_dir = _find_dir(root, ["masks", "mask", "labels", "ground_truth", "groundtruth"])
    if img_dir and mask_dir:
        layout = "kvasir-seg" if "kvasir" in root.name.lower() else "images/masks"
        return layout, _match(_images_in(img_dir), _images_in(mask_dir), root, problems), problems
    # ISIC: *_segmentation.png anywhere (same or separate folder)
    files = _images_in(root, recursive=True)
    seg = [p for p in files if p.stem.endswith("_segmentation")]
    if seg:
        images = [p for p in files if not p.stem.endswith("_segmentation")
                  and not p.stem.endswith("_superpixels")]
        return "isic", _match(images, seg, root, problems), problems
    if not files:
        raise InputError(f"{root}: no images found (expected images/ and masks/ folders, or a PH2, "
                         "ISIC, Kvasir-SEG or CVC-ClinicDB layout)")
    raise InputError(f"{root}: cannot find masks (expected images/ and masks/ folders, or a PH2, "
                     "ISIC (*_segmentation.png), Kvasir-SEG or CVC-ClinicDB layout)")


def discover_unlabeled(root: Path | str) -> list[Path]:
    """Images of an unlabeled folder (or of its ``images/`` sub-folder)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: folder not found" if not root.exists() else f"{root}: not a folder")
    sub = _find_dir(root, ["images"])
    files = _images_in(sub or root)
    if not files:
        raise InputError(f"{sub or root}: no images found (extensions {', '.join(IMAGE_EXTS)})")
    return files


# ----------------------------------------------------------------------------------------
# decoding
# ----------------------------------------------------------------------------------------
def read_image(path: Path) -> np.ndarray:
    """RGB uint8 (H, W, 3); grayscale and RGBA images are converted."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (0, 0, 0, 255))
                im = Image.alpha_composite(bg, im)
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"{path}: unreadable or corrupt image ({e})") from None


def read_mask(path: Path) -> tuple[np.ndarray, bool]:
    """Binary uint8 (H, W) mask in {0, 1}, and whether it had grey levels."""
    try:
        with Image.open(path) as im:
            im.load()
            a = np.asarray(im.convert("L"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"{path}: unreadable or corrupt mask ({e})") from None
    vmax = int(a.max()) if a.size else 0
    grey = bool(np.any((a != 0) & (a != vmax)))
    if not grey:  # two levels {0, v} ({0, 1}, {0, 255}, or any other v): foreground is v
        return (a > 0).astype(np.uint8), False
    return (a > 127).astype(np.uint8), grey


def resize_image(img: np.ndarray, size: int) -> np.ndarray:
    if img.shape[:2] == (size, size):
        return img
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    if mask.shape[:2] == (size, size):
        return mask
    soft = cv2.resize(mask.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
    return (soft >= 0.5).astype(np.uint8)



def positions(stems: Sequence[str]) -> dict[str, int]:
    """stem -> its position in ``stems`` (a data set's row of each stem)."""
    return {s: i for i, s in enumerate(stems)}

# ----------------------------------------------------------------------------------------
# data sets
# ----------------------------------------------------------------------------------------
@dataclass
class LabeledData:
    root: Path
    layout: str
    stems: list[str]
    images: np.ndarray  # (N, S, S, 3) uint8
    masks: np.ndarray  # (N, S, S) uint8 {0, 1}
    orig_sizes: np.ndarray  # (N, 2) original (height, width)
    grey_masks: int = 0  # masks that had grey levels and were binarised

    def __len__(self) -> int:
        return len(self.stems)

    def subset(self, stems: Sequence[str]) -> "LabeledData":
        pos = positions(self.stems)
        idx = np.array([pos[s] for s in stems], dtype=np.int64)
        return LabeledData(self.root, self.layout, list(stems), self.images[idx], self.masks[idx],
                           self.orig_sizes[idx], self.grey_masks)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])


@dataclass
class UnlabeledData:
    root: Path
    stems: list[str]
    images: np.ndarray  # (M, S, S, 3) uint8

    def __len__(self) -> int:
        return len(self.stems)


def cache_root(cache_dir: str = "") -> Path:
    if cache_dir:
        return Path(cache_dir)
    env = os.environ.get("QGSEG_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qgseg"


def _cache_key(kind: str, files: Iterable[Path], size: int) -> str:
    h = hashlib.sha1(f"{kind}|{size}|v{CACHE_VERSION}".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def _load_cache(path: Path) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError):
        return None  # a damaged cache is rebuilt


def _save_cache(path: Path, **arrays: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError as e:  # a read-only cache is not fatal
        log.warning("cannot write data cache %s (%s)", path, e)


def _warn_grey(root: Path, grey: int, n: int) -> None:
    if grey:
        log.warning("%s: %d of %d masks had grey levels and were binarised at 127", root, grey, n)


def scan_labeled(root: Path | str, image_size: int, cache_dir: str = "") -> tuple[LabeledData | None, list[str]]:
    """Decode, validate and resize a labeled set. Returns (data or None, problems).

    Problems are errors that make the data unusable (unmatched stems, size mismatch, corrupt
    files); data is None when there are any.
    """
    root = Path(root)
    if image_size < 1:
        raise InputError(f"image size {image_size}: expected a positive number of pixels")
    layout, pairs, problems = discover_labeled(root)
    if not pairs and not problems:
        raise InputError(f"{root}: no image/mask pairs found")
    key = _cache_key("labeled", [p.image for p in pairs] + [p.mask for p in pairs], image_size)
    cpath = cache_root(cache_dir) / f"labeled-{key}.npz"
    cached = None if problems else _load_cache(cpath)
    stems = [p.stem for p in pairs]
    if cached is not None and list(cached["stems"]) == stems:
        data = LabeledData(root, layout, stems, cached["images"], cached["masks"],
                           cached["orig_sizes"], int(cached["grey"]))
        _warn_grey(root, data.grey_masks, len(data))  # every load says so, not only the first
        return data, problems
    n, s = len(pairs), image_size
    if n >= _SAY_DECODING:
        log.info("%s: decoding %d image/mask pairs at %d px (cached for the next run)", root, n, s)
    images = np.zeros((n, s, s, 3), np.uint8)
    masks = np.zeros((n, s, s), np.uint8)
    sizes = np.zeros((n, 2), np.int32)
    grey = 0
    for i, p in enumerate(pairs):
        try:
            img = read_image(p.image)
            m, g = read_mask(p.mask)
        except InputError as e:
            problems.append(str(e))
            continue
        if img.shape[:2] != m.shape[:2]:
            problems.append(f"{p.mask}: mask size {m.shape[1]}x{m.shape[0]} differs from image "
                            f"{p.image.name} size {img.shape[1]}x{img.shape[0]} (width x height)")
            continue
        grey += int(g)
        images[i] = resize_image(img, s)
        masks[i] = resize_mask(m, s)
        sizes[i] = img.shape[:2]
    if problems:
        return None, problems
    _warn_grey(root, grey, n)
    _save_cache(cpath, stems=np.array(stems), images=images, masks=masks, orig_sizes=sizes,
                grey=np.array(grey))
    return LabeledData(root, layout, stems, images, masks, sizes, grey), problems


def load_labeled(root: Path | str, image_size: int, cache_dir: str = "", option: str = "--labeled") -> LabeledData:
    """Like :func:`scan_labeled` but raises InputError naming the first problem."""
    if not str(root):
        raise InputError(f"{option}: no labeled data folder given (or set data.labeled in qgseg.toml)")
    data, problems = scan_labeled(root, image_size, cache_dir)
    if problems:
        more = f" (and {len(problems) - 1} more problems; run `qgseg inspect {root}`)" if len(problems) > 1 else ""
        raise InputError(problems[0] + more)
    assert data is not None
    return data


def load_unlabeled(root: Path | str, image_size: int, cache_dir: str = "", limit: int = 0,
                   seed: int = 0, option: str = "--unlabeled") -> UnlabeledData:
    """Decode and resize an unlabeled folder (cached). ``limit`` > 0 keeps a seeded subset."""
    if not str(root):
        raise InputError(f"{option}: no unlabeled data folder given (or set data.unlabeled in qgseg.toml)")
    root = Path(root)
    files = discover_unlabeled(root)
    key = _cache_key("unlabeled", files, image_size)
    cpath = cache_root(cache_dir) / f"unlabeled-{key}.npz"
    stems = [f.stem for f in files]
    cached = _load_cache(cpath)
    if cached is not None and list(cached["stems"]) == stems:
        images = cached["images"]
    else:
        if len(files) >= _SAY_DECODING:
            log.info("%s: decoding %d unlabeled images at %d px (cached for the next run)", root, len(files),
                     image_size)
        images = np.zeros((len(files), image_size, image_size, 3), np.uint8)
        for i, f in enumerate(files):
            images[i] = resize_image(read_image(f), image_size)
        _save_cache(cpath, stems=np.array(stems), images=images)
    if limit and limit < len(files):
        idx = np.sort(np.random.default_rng(seed).permutation(len(files))[:limit])
        return UnlabeledData(root, [stems[i] for i in idx], images[idx])
    return UnlabeledData(root, stems, images)


# ----------------------------------------------------------------------------------------
# splits
# ----------------------------------------------------------------------------------------
MIN_PAIRS = 3  # one case each for train, val and test: every training command needs at least this many


def make_splits(stems: Sequence[str], seed: int, root: Path | str | None = None) -> dict[str, list[str]]:
    """70:10:20 train/val/test, deterministic from ``seed``; ``root/splits.csv`` overrides."""
    if root is not None and (Path(root) / "splits.csv").is_file():
        return read_splits_csv(Path(root) / "splits.csv", stems)
    n = len(stems)
    if n < MIN_PAIRS:
        raise InputError(f"{root or 'data'}: {n} labeled pairs; at least {MIN_PAIRS} are needed for train/val/test "
                         "splits")
    order = np.random.default_rng(seed).permutation(n)
    by_name = sorted(stems)
    ordered = [by_name[i] for i in order]
    n_test = max(1, int(round(0.2 * n)))
    n_val = max(1, int(round(0.1 * n)))
    out = {"train": sorted(ordered[n_test + n_val:]), "val": sorted(ordered[n_test:n_test + n_val]),
           "test": sorted(ordered[:n_test])}
    return out


def run_splits(stems: Sequence[str], seed: int, root: Path | str | None = None,
               max_labeled: int = 0) -> dict[str, list[str]]:
    """The splits of a run: :func:`make_splits`, with the training cases capped at
    ``max_labeled`` (a subset seeded by ``seed``; the rest listed under ``"unused"``)."""
    splits = make_splits(stems, seed, root)
    if max_labeled and max_labeled < len(splits["train"]):
        order = np.random.default_rng(seed).permutation(len(splits["train"]))
        keep = sorted(splits["train"][i] for i in order[:max_labeled])
        splits["unused"] = sorted(set(splits["train"]) - set(keep))
        splits["train"] = keep
    return splits


def read_splits_csv(path: Path, stems: Sequence[str]) -> dict[str, list[str]]:
    """Splits from a ``stem,split`` CSV (optional header, ``#`` comments); unlisted stems are unused."""
    known = set(stems)
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    where: dict[str, int] = {}
    try:
        # utf-8-sig: spreadsheets often write a byte-order mark
        rows = list(csv.reader(Path(path).read_text(encoding="utf-8-sig").splitlines()))
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text (expected CSV lines 'stem,split')") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    header_allowed = True  # the first line that is not a comment may be the header (shared CVC: comment first)
    for lineno, row in enumerate(rows, 1):
        if not row or row[0].startswith("#"):
            continue
        if header_allowed and row[0].strip().lower() == "stem":
            header_allowed = False
            continue
        header_allowed = False
        if len(row) < 2:
            raise InputError(f"{path}:{lineno}: expected 'stem,split'")
        stem, split = row[0].strip(), row[1].strip().lower()
        if split not in SPLITS:
            raise InputError(f"{path}:{lineno}: split '{split}' must be one of train, val, test")
        if stem not in known:
            raise InputError(f"{path}:{lineno}: no image/mask pair with stem '{stem}'")
        if stem in where:  # the same case in two splits would leak test data into training
            raise InputError(f"{path}:{lineno}: stem '{stem}' is listed more than once "
                             f"(first on line {where[stem]})")
        where[stem] = lineno
        out[split].append(stem)
    for s in SPLITS:
        if not out[s]:
            raise InputError(f"{path}: the {s} split is empty")
    return {k: sorted(v) for k, v in out.items()}


# ----------------------------------------------------------------------------------------
# summaries
# ----------------------------------------------------------------------------------------
def describe(data: LabeledData) -> dict:
    """What a labeled set holds (for ``qgseg inspect``)."""
    cov = data.masks.reshape(len(data), -1).mean(axis=1) if len(data) else np.zeros(0)
    sizes = [f"{w}x{h}" for h, w in data.orig_sizes.tolist()]
    uniq: dict[str, int] = {}
    for s in sizes:
        uniq[s] = uniq.get(s, 0) + 1
    return {
        "root": str(data.root),
        "layout": data.layout,
        "pairs": len(data),
        "image_sizes": dict(sorted(uniq.items(), key=lambda kv: -kv[1])),
        "coverage_min": float(cov.min()) if len(cov) else 0.0,
        "coverage_median": float(np.median(cov)) if len(cov) else 0.0,
        "coverage_max": float(cov.max()) if len(cov) else 0.0,
        "empty_masks": int((cov == 0).sum()),
        "grey_masks": int(data.grey_masks),
    }


# ----------------------------------------------------------------------------------------
# tensors
# ----------------------------------------------------------------------------------------
_MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)  # grey level of an RGB pixel (ITU-R BT.601)


def to_float_images(x: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) normalised with ImageNet statistics."""
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    return (x - _MEAN.to(x.device)) / _STD.to(x.device)


def random_color(x: torch.Tensor, strength: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample colour jitter of normalised (B, 3, H, W) images, batched: brightness, contrast
    (about the image's mean grey level) and saturation (towards the pixel's grey level), each a
    factor drawn uniformly from [1 - strength, 1 + strength]; pixel values are clipped to [0, 1]."""
    mean, std = _MEAN.to(x.device, x.dtype), _STD.to(x.device, x.dtype)
    luma = _LUMA.to(x.device, x.dtype)
    f = (1 + strength * (2 * torch.rand(3, x.shape[0], 1, 1, 1, generator=generator) - 1)).to(x.device, x.dtype)
    rgb = (x * std + mean) * f[0]
    level = (rgb * luma).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    rgb = (rgb - level) * f[1] + level
    grey = (rgb * luma).sum(1, keepdim=True)
    rgb = (rgb - grey) * f[2] + grey
    return (rgb.clamp(0, 1) - mean) / std


def to_float_masks(m: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W) {0, 1} -> float (B, 1, H, W)."""
    return m.unsqueeze(1).float()


_DIHEDRAL: dict[tuple[int, str], torch.Tensor] = {}


def _dihedral_maps(size: int, device: torch.device) -> torch.Tensor:
    """(8, size*size) source pixel of each output pixel for the 8 dihedral transforms.

    Code c: flip the last axis if c & 1, then ``rot90`` c >> 1 times over the last two axes, the
    same operations applied to an index grid, so a gather with these maps is exact.
    """
    key = (size, str(device))
    if key not in _DIHEDRAL:
        grid = torch.arange(size * size).view(size, size)
        maps = []
        for code in range(8):
            v = grid.flip(-1) if code & 1 else grid
            maps.append(torch.rot90(v, code >> 1, dims=(-2, -1)).reshape(-1))
        _DIHEDRAL[key] = torch.stack(maps).to(device)
    return _DIHEDRAL[key]


def _gather_pixels(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t (B,C,S,S) with pixels taken from idx (B, S*S); keeps channels_last inputs channels_last."""
    b, c, h, w = t.shape
    if c > 1 and t.is_contiguous(memory_format=torch.channels_last):
        flat = t.permute(0, 2, 3, 1).reshape(b, h * w, c)
        out = flat.gather(1, idx.unsqueeze(2).expand(b, h * w, c))
        return out.view(b, h, w, c).permute(0, 3, 1, 2)
    flat = t.reshape(b, c, h * w)
    return flat.gather(2, idx.unsqueeze(1).expand(b, c, h * w)).view(b, c, h, w)


def random_flip_rot(x: torch.Tensor, *others: torch.Tensor, generator: torch.Generator | None = None):
    """The same random dihedral transform (flips + 90 degree turns) per sample, batched.

    All tensors are (B, C, H, W) with square H == W. Returns the transformed tensors. The
    transform code (0-7) per sample comes from ``generator``; applying it is one gather per
    tensor on the tensors' device (no per-code loop, no host-device synchronisation).
    """
    b, size = x.shape[0], x.shape[-1]
    if any(t.shape[-2:] != (size, size) or t.shape[0] != b for t in (x,) + others):
        raise ValueError(f"random_flip_rot needs square (B, C, S, S) tensors of one size, got "
                         f"{[tuple(t.shape) for t in (x,) + others]}")
    r = torch.randint(0, 8, (b,), generator=generator)
    idx = _dihedral_maps(size, x.device).index_select(0, r.to(x.device, non_blocking=True))
    outs = [_gather_pixels(t, idx) for t in (x,) + others]
    return outs[0] if not others else tuple(outs)


def index_batches(n: int, batch_size: int, generator: torch.Generator, shuffle: bool = True,
                  drop_last: bool = True) -> list[torch.Tensor]:
    """Index batches of one pass over ``n`` samples (a seeded permutation when shuffling).

    Under torchrun every rank draws the same permutation and takes its slice of each global
    batch of ``world_size * batch_size`` indices (as DistributedSampler does).
    """
    from qgseg import distributed

    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    world, rank = distributed.world_size(), distributed.rank()
    if world > 1:
        batch_size = min(batch_size, max(1, n // world))
        glob = batch_size * world
        stop = n - n % glob
        return [order[i + rank * batch_size:i + (rank + 1) * batch_size] for i in range(0, stop, glob)]
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    return [order[i:i + batch_size] for i in range(0, stop, batch_size)]
