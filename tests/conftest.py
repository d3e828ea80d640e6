"""Shared test fixtures for qgseg.

Fixtures and helpers other test files may use (keep these names stable):

``synth_data``  (session scope)
    Path of a synthetic data set written once per session by ``qgseg.synth.generate``:
    ``synth_data / "labeled"`` holds ``images/`` + ``masks/`` (24 pairs ``case_000`` ...),
    ``synth_data / "unlabeled"`` holds ``images/`` (24 images ``u_0000`` ...), all 64 x 64 PNG.
    Shared by every test: treat it as read-only (copy it with ``shutil.copytree`` to modify).
    ``SYNTH_LABELED``, ``SYNTH_UNLABELED`` and ``SYNTH_SIZE`` give its counts and size.

``tiny_labeled``  (function scope)
    A factory writing a generic ``images/`` + ``masks/`` PNG set under the test's tmp_path::

        root = tiny_labeled(6)                       # 6 pairs, 64 px, masks named <stem>.png
        root = tiny_labeled(4, size=32, mask_suffix="_mask", name="other")

    Each case is an RGB image with a filled ellipse (the lesion) and its {0, 255} mask.
    Arguments: ``n`` pairs, ``size`` px, ``name`` (folder under tmp_path, default "labeled"),
    ``mask_suffix`` ("", "_mask", "_segmentation", "_lesion"), ``image_ext`` / ``mask_ext``
    (".png" by default), ``seed``. Returns the data folder.

``PH2`` and ``needs_ph2``
    ``PH2`` is ``../shared/data/ph2`` relative to the repository root (200 labeled pairs);
    decorate tests that read it with ``@needs_ph2`` (``from conftest import PH2, needs_ph2``),
    or request the ``ph2`` fixture, which returns the path or skips.

Automatic (autouse) for every test:
    * ``QGSEG_CACHE`` points at a fresh tmp folder, so nothing is written to ``~/.cache``;
    * the ``qgseg`` logger is reset afterwards (CLI commands attach stderr handlers and turn
      propagation off, which would otherwise break ``caplog`` in later tests).
``NO_ALBUMENTATIONS_UPDATE=1`` is set when this file is imported.
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Callable, Iterator

os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
# Several torch processes sharing 2 cores slow each other ~10x with OpenMP's default busy-wait
# (measured, see docs/architecture.md); set before torch is imported by any test module.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

PH2 = Path(__file__).parents[1].parent / "shared" / "data" / "ph2"
needs_ph2 = pytest.mark.skipif(
    not (PH2 / "images").is_dir(),
    reason=f"PH2 data not available at {PH2} (../shared/data/ph2 relative to the repository root)",
)

@contextlib.contextmanager
def synth_world(tmp_path_factory: pytest.TempPathFactory, name: str, *, n_labeled: int, n_unlabeled: int,
                size: int, seed: int, unlabeled: bool = False) -> Iterator[tuple[Path, dict[str, str]]]:
    """Setup shared by the module-scoped fixtures of command tests: a new temp folder ``name`` with
    its own data cache and a synthetic data set under ``data/``. Yields (root, options) where
    options name the labeled folder (and the unlabeled one with ``unlabeled=True``) and the runs root."""
    from qgseg.synth import generate

    root = tmp_path_factory.mktemp(name)
    mp = pytest.MonkeyPatch()
    mp.setenv("QGSEG_CACHE", str(root / "cache"))
    generate(root / "data", n_labeled=n_labeled, n_unlabeled=n_unlabeled, size=size, seed=seed)
    opts = {"data.labeled": str(root / "data" / "labeled"), "runs_root": str(root / "runs")}
    if unlabeled:
        opts["data.unlabeled"] = str(root / "data" / "unlabeled")
    try:
        yield root, opts
    finally:
        mp.undo()


SYNTH_LABELED = 24
SYNTH_UNLABELED = 24
SYNTH_SIZE = 64


@pytest.fixture(autouse=True)
def _isolated_cache(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Point the data cache at a per-test tmp folder (never ~/.cache)."""
    cache = tmp_path_factory.mktemp("qgseg-cache")
    monkeypatch.setenv("QGSEG_CACHE", str(cache))
    monkeypatch.setenv("NO_ALBUMENTATIONS_UPDATE", "1")
    return cache


@pytest.fixture(autouse=True)
def _reset_qgseg_logger():
    """Undo what ``report.setup_logging`` does to the ``qgseg`` logger during a test."""
    yield
    log = logging.getLogger("qgseg")
    for h in list(log.handlers):
        log.removeHandler(h)
    log.setLevel(logging.NOTSET)
    log.propagate = True


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic labeled + unlabeled set (24 + 24 at 64 px), written once per session."""
    from qgseg.synth import generate

    out = tmp_path_factory.mktemp("synth")
    generate(out, n_labeled=SYNTH_LABELED, n_unlabeled=SYNTH_UNLABELED, size=SYNTH_SIZE, seed=0)
    return out


def write_pair(images: Path, masks: Path, stem: str, size: int, rng: np.random.Generator,
               mask_suffix: str = "", image_ext: str = ".png", mask_ext: str = ".png") -> None:
    """One RGB image with a filled ellipse and its {0, 255} mask."""
    h = w = size
    img = np.empty((h, w, 3), np.uint8)
    img[:] = rng.integers(150, 230, 3, dtype=np.uint8)
    img = np.clip(img.astype(np.int16) + rng.integers(-10, 10, (h, w, 3)), 0, 255).astype(np.uint8)
    mask = np.zeros((h, w), np.uint8)
    center = (int(rng.integers(w // 3, 2 * w // 3)), int(rng.integers(h // 3, 2 * h // 3)))
    axes = (int(rng.integers(w // 8, w // 4)), int(rng.integers(h // 8, h // 4)))
    angle = float(rng.uniform(0, 180))
    cv2.ellipse(mask, center, axes, angle, 0, 360, 255, -1)
    colour = tuple(int(c) for c in rng.integers(30, 110, 3))
    cv2.ellipse(img, center, axes, angle, 0, 360, colour, -1)
    assert cv2.imwrite(str(images / f"{stem}{image_ext}"), img[..., ::-1])
    assert cv2.imwrite(str(masks / f"{stem}{mask_suffix}{mask_ext}"), mask)


@pytest.fixture
def tiny_labeled(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``tiny_labeled(n=6, size=64, ...)`` -> folder with images/ + masks/ (see module doc)."""

    def make(n: int = 6, size: int = 64, name: str = "labeled", mask_suffix: str = "",
             image_ext: str = ".png", mask_ext: str = ".png", seed: int = 0) -> Path:
        root = tmp_path / name
        images, masks = root / "images", root / "masks"
        images.mkdir(parents=True, exist_ok=True)
        masks.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(seed)
        for i in range(n):
            write_pair(images, masks, f"case{i:02d}", size, rng, mask_suffix, image_ext, mask_ext)
        return root

    return make


@pytest.fixture
def ph2() -> Path:
    """The PH2 folder, or skip the test when ../shared/data/ph2 is absent."""
    if not (PH2 / "images").is_dir():
        pytest.skip(f"PH2 data not available at {PH2} (../shared/data/ph2 relative to the repository root)")
    return PH2
