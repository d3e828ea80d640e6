"""``qgseg select``: rank unlabeled images for annotation, and measure the ranking by simulation.

A strategy orders the images of a pool from most to least worth annotating:

- ``quality``: lowest predicted quality g(x, f(x)) of the model's own prediction first (the
  paper's "future work": annotate where g expects the segmenter to fail);
- ``confidence``: lowest segmenter confidence first (mean margin |2p - 1| over its object and
  uncertain rim, see :func:`qgseg.predict.confidence`);
- ``agreement``: lowest agreement between the plain prediction and its flipped / rotated
  re-predictions first;
- ``random``: a seeded random order (the baseline every strategy must beat).

:func:`run_simulation` (``qgseg select --simulate``) measures them: from a small seeded labeled
subset of the training split, each strategy adds ``budget`` images per round from the rest of
the training split (their masks revealed), ``sup`` is retrained, and its test DSC is recorded,
for several seeds. Every training is an ordinary ssl run whose data folder is a view of the
labeled set (symlinked ``images/`` and ``masks/``) with a ``splits.csv`` naming the round's
training images, so each round can be inspected, evaluated or resumed like any other run.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from qgseg.errors import InputError

log = logging.getLogger("qgseg")
STRATEGIES = ("quality", "confidence", "agreement", "random")
SIGNALS = ("quality", "confidence", "agreement")  # the score column each non-random strategy ranks by
SHEET_PICKS = 12


def check_strategy(strategy: str, option: str = "--strategy") -> str:
    if strategy not in STRATEGIES:
        raise InputError(f"{option} {strategy}: expected one of {', '.join(STRATEGIES)}")
    return strategy


def rank(table: pd.DataFrame, strategy: str, seed: int = 0) -> np.ndarray:
    """Row positions of ``table`` from most to least worth annotating under ``strategy``.

    Score strategies put the lowest score first (ties in table order); ``random`` is a
    permutation seeded by ``seed``. A score strategy whose column has no values is an error.
    """
    check_strategy(strategy)
    n = len(table)
    if strategy == "random":
        return np.random.default_rng(seed).permutation(n)
    scores = table[strategy].to_numpy(dtype=float)
    if n and np.isnan(scores).all():
        why = {"quality": "no quality predictor g (pass --quality RUN)",
               "agreement": "agreement needs --tta 2, 4 or 8"}.get(strategy, "no scores")
        raise InputError(f"--strategy {strategy}: {why}")
    return np.argsort(np.nan_to_num(scores, nan=np.inf), kind="stable")


def pick(table: pd.DataFrame, strategy: str, budget: int, seed: int = 0) -> np.ndarray:
    """The first ``budget`` rows of :func:`rank`."""
    if budget < 1:
        raise InputError(f"--budget {budget}: expected a number of images >= 1")
    return rank(table, strategy, seed)[:budget]


# ---------------------------------------------------------------------------------------------
# `qgseg select --model RUN --unlabeled DIR --budget N`
# ---------------------------------------------------------------------------------------------
def run_select(loaded: Any, model_run: str | Path, unlabeled: str | Path, budget: int, strategy: str = "quality",
               quality: str | None = None, out: str | Path | None = None, tta: int = 4,
               checkpoint: str = "best") -> dict[str, Any]:
    """Rank the images of ``unlabeled`` for annotation with the segmenter of ``model_run``.

    Writes ``selection.csv`` (every image, best pick first: rank, stem, picked, quality,
    confidence, agreement, foreground), ``picks.png`` (the picks with the model's prediction in
    red) and ``summary.json`` into ``out`` (default ``runs/select/<timestamp>``).
    """
    from qgseg import plots
    from qgseg.config import load_run_config
    from qgseg.data import load_unlabeled
    from qgseg.engine import resolve_device
    from qgseg.predict import g_for, load_segmenter, score_images
    from qgseg.runs import atomic_write_text, json_ready, new_run_dir, write_json

    check_strategy(strategy)
    if budget < 1:
        raise InputError(f"--budget {budget}: expected a number of images >= 1")
    if strategy == "agreement" and tta < 2:
        raise InputError(f"--tta {tta}: the agreement strategy needs 2, 4 or 8 views")
    model, run, ck_path = load_segmenter(model_run, checkpoint, option="--model")
    size = load_run_config(run.path).data.image_size
    device = resolve_device(loaded.config.device)
    g, note = (None, "") if strategy in ("random", "confidence", "agreement") and not quality else \
        g_for(run, quality, loaded.config.runs_root, size, device)
    if strategy == "quality" and g is None:
        raise InputError(f"--strategy quality: {note}")
    pool = load_unlabeled(unlabeled, size, loaded.config.data.cache_dir, option="--unlabeled")
    probs, table = score_images(model.to(device), pool.images, device, g.to(device) if g is not None else None,
                                views=tta)
    order = rank(table, strategy, loaded.config.seed)
    table.insert(0, "stem", pool.stems)
    ranked = table.iloc[order].reset_index(drop=True)
    ranked.insert(0, "rank", np.arange(1, len(ranked) + 1))
    ranked.insert(2, "picked", ranked["rank"] <= budget)
    out = Path(out) if out else new_run_dir(loaded.config.runs_root, "select", strategy)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "selection.csv", ranked.to_csv(index=False))
    shown = order[:min(budget, SHEET_PICKS)]
    masks = (probs > 0.5).astype(np.uint8)
    labels = [f"#{i + 1} {pool.stems[j]}\n" + _score_label(table.iloc[j], strategy) for i, j in enumerate(shown)]
    sheet = plots.overlay_montage(pool.images[shown], np.zeros_like(masks[shown]), masks[shown], labels,
                                  out / "picks.png", per_row=4,
                                  title=f"select {strategy}: the first {len(shown)} picks (red: the model's prediction)")
    summary: dict[str, Any] = {
        "out": str(out), "model": str(run.path), "checkpoint": ck_path.name, "unlabeled": str(unlabeled),
        "strategy": strategy, "budget": budget, "pool": len(pool), "tta": tta, "seed": loaded.config.seed,
        "quality_run": g.source if g is not None else "", "picked": [pool.stems[j] for j in order[:budget]],
        "selection": str(out / "selection.csv"), "sheet": str(sheet),
    }
    if note and strategy != "quality":
        summary["note"] = note
    summary = json_ready(summary)  # strict JSON: an undefined metric is null
    write_json(out / "summary.json", summary)
    return summary


def _score_label(row: pd.Series, strategy: str) -> str:
    parts = [f"{k[0]} {row[k]:.3f}" for k in SIGNALS if k in row and not pd.isna(row[k])]
    return ", ".join(parts) if parts else strategy


# ---------------------------------------------------------------------------------------------
# `qgseg select --simulate`: a simulated annotation loop
# ---------------------------------------------------------------------------------------------
def data_view(root: Path, source: Path, splits: dict[str, Sequence[str]]) -> Path:
    """A labeled folder ``root`` that shows ``source``'s images/ and masks/ (symlinks) with its own
    splits.csv (stems not listed are unused). Returns ``root``."""
    from qgseg.data import discover_labeled
    from qgseg.runs import atomic_write_text

    layout, pairs, problems = discover_labeled(source)
    if problems:
        raise InputError(f"{problems[0]} (run `qgseg inspect {source}`)")
    root.mkdir(parents=True, exist_ok=True)
    for name in ("images", "masks"):
        link = root / name
        target = (pairs[0].image if name == "images" else pairs[0].mask).parent.resolve()
        if not link.exists():
            os.symlink(target, link, target_is_directory=True)
    lines = ["stem,split"] + [f"{s},{k}" for k in ("train", "val", "test") for s in sorted(splits[k])]
    atomic_write_text(root / "splits.csv", "\n".join(lines) + "\n")
    return root


def _check_layout(source: Path) -> None:
    from qgseg.data import discover_labeled

    layout, pairs, problems = discover_labeled(source)
    if problems:
        raise InputError(f"{problems[0]} (run `qgseg inspect {source}`)")
    if len({p.image.parent for p in pairs}) != 1 or len({p.mask.parent for p in pairs}) != 1:
        raise InputError(f"--labeled {source}: --simulate needs one folder of images and one of masks "
                         f"(found the {layout} layout with images in several folders)")


def _train_sup(cfg: Any, data_dir: Path, out: Path, seed: int) -> dict[str, Any]:
    """One ``sup`` training on the view ``data_dir``: a completed run is read, an unfinished one resumed."""
    from qgseg.config import Loaded
    from qgseg.runs import Run
    from qgseg.ssl import run_ssl

    run = Run(out)
    if run.status == "completed":
        return run.summary
    c = cfg.replace(**{"data.labeled": str(data_dir), "seed": seed, "ssl.method": "sup", "ssl.qw": False,
                       "ssl.qar_weight": 0.0, "ssl.quality": ""})
    _, summary = run_ssl(Loaded(c, {}, ""), out=out, resume=run.meta_path.is_file())
    return summary


def _train_g(cfg: Any, data_dir: Path, out: Path, seed: int) -> str:
    """g trained on the initial labeled subset only (Type 1 corruptions: no weak run)."""
    from qgseg.config import Loaded
    from qgseg.runs import Run
    from qgseg.train_quality import run_train_quality

    run = Run(out)
    if run.status != "completed":
        c = cfg.replace(**{"data.labeled": str(data_dir), "seed": seed, "corrupt.p_weak": 0.0, "corrupt.run": "",
                           "weak.run": ""})
        run_train_quality(Loaded(c, {}, ""), out=out, resume=run.meta_path.is_file())
    return str(out)


def _score_pool(run_dir: Path, data: Any, pool: list[str], g: Any, tta: int, device: Any) -> pd.DataFrame:
    """Scores of the round's model on the pool, with the (hidden until picked) true Dice."""
    import torch

    from qgseg.metrics import dice_per_sample
    from qgseg.predict import load_segmenter, score_images

    model, _, _ = load_segmenter(run_dir, "best")
    sub = data.subset(pool)
    probs, table = score_images(model.to(device), sub.images, device, g, views=tta)
    table.insert(0, "stem", pool)
    table["true_dice"] = dice_per_sample(torch.from_numpy(probs > 0.5), torch.from_numpy(sub.masks.astype(bool))).numpy()
    return table


def run_simulation(loaded: Any, labeled: str | Path, out: str | Path | None = None, initial: int = 10,
                   budget: int = 10, rounds: int = 2, seeds: int = 3, strategies: Sequence[str] = STRATEGIES,
                   tta: int = 4) -> dict[str, Any]:
    """The simulated annotation loop (see the module docstring). Resumable: rerun to continue.

    Layout of ``out``: ``seed<k>/round0`` (the shared start: data view + ssl run),
    ``seed<k>/g`` (train-quality on the initial subset; only for the quality strategy),
    ``seed<k>/<strategy>/round<r>`` (``picks.csv`` with every pool image's scores and true Dice,
    the data view and the ssl run). ``results.csv`` has one row per seed, strategy and round;
    ``summary.json`` the mean ± s.e. over seeds and each strategy's gain over random.
    """
    from qgseg.data import load_labeled, make_splits
    from qgseg.quality import QualityPredictor
    from qgseg.runs import atomic_write_text, json_ready, write_json

    _check_simulation(strategies, initial, budget, rounds, seeds, tta)
    cfg = loaded.config
    source = Path(labeled)
    _check_layout(source)
    data = load_labeled(source, cfg.data.image_size, cfg.data.cache_dir)
    base = make_splits(data.stems, cfg.data.split_seed, data.root)
    need = initial + budget * rounds
    if need > len(base["train"]):
        raise InputError(f"--initial {initial} + --rounds {rounds} x --budget {budget} = {need} images, but the "
                         f"training split of {source} has {len(base['train'])}")
    out = Path(out) if out else Path(cfg.runs_root) / "select-simulate" / source.resolve().name
    out.mkdir(parents=True, exist_ok=True)
    cfg = cfg.replace(runs_root=str(out.resolve()))  # no train-quality run of elsewhere joins the val columns
    settings = _claim(out, {"labeled": str(source.resolve()), "image_size": cfg.data.image_size,
                            "initial": initial, "budget": budget, "rounds": rounds, "tta": tta,
                            "split_seed": cfg.data.split_seed, "config": _config_digest(cfg)})
    loop = _Loop(cfg, data, source, base, budget, rounds, tta)
    results: list[dict[str, Any]] = []
    for seed in range(seeds):
        sd = out / f"seed{seed}"
        rng = np.random.default_rng(seed)
        start = sorted(base["train"][i] for i in rng.permutation(len(base["train"]))[:initial])
        log.info("seed %d: round 0 (%d labeled images)", seed, len(start))
        s0 = _train_sup(cfg, loop.view(sd / "round0", start), sd / "round0" / "run", seed)
        results += [_row(seed, strategy, 0, len(start), s0, sd / "round0" / "run") for strategy in strategies]
        g = None
        if "quality" in strategies:
            log.info("seed %d: g on the %d initial images", seed, len(start))
            g = QualityPredictor.from_run(_train_g(cfg, loop.view(sd / "g", start), sd / "g" / "run", seed))
        for strategy in strategies:
            results += loop.rounds(sd, seed, strategy, start, g)
            atomic_write_text(out / "results.csv", pd.DataFrame(results).to_csv(index=False))
    frame = pd.DataFrame(results)
    atomic_write_text(out / "results.csv", frame.to_csv(index=False))
    summary = {"out": str(out), **settings, "seeds": seeds, "strategies": list(strategies),
               "table": aggregate(frame), "gain_over_random": gains(frame)}
    summary = json_ready(summary)  # strict JSON: an undefined metric is null
    write_json(out / "summary.json", summary)
    return summary


def _check_simulation(strategies: Sequence[str], initial: int, budget: int, rounds: int, seeds: int,
                      tta: int) -> None:
    for s in strategies:
        check_strategy(s, "--strategies")
    if not strategies:
        raise InputError("--strategies: name at least one strategy")
    if initial < 2:
        raise InputError(f"--initial {initial}: expected at least 2 labeled images (BatchNorm needs two)")
    if budget < 1 or rounds < 1 or seeds < 1:
        raise InputError("--budget, --rounds and --seeds must be at least 1")
    if "agreement" in strategies and tta < 2:
        raise InputError(f"--tta {tta}: the agreement strategy needs 2, 4 or 8 views")


def _claim(out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Record the simulation's settings in ``out``; a folder holding another simulation is refused."""
    from qgseg.runs import read_json, write_json

    path = out / "simulate.json"
    if path.is_file():
        old = read_json(path)
        differ = [k for k in settings if old.get(k) != settings[k]]
        if differ:
            what = ("other training settings (--preset / --config / --set)" if differ[0] == "config"
                    else f"{differ[0]} = {old.get(differ[0])!r}, not {settings[differ[0]]!r}")
            raise InputError(f"--out {out}: holds a simulation with {what}; choose another folder")
    write_json(path, settings)
    return settings


class _Loop:
    """The annotation rounds of one strategy and seed, sharing data, splits and scored pools."""

    def __init__(self, cfg: Any, data: Any, source: Path, base: dict[str, list[str]], budget: int, rounds: int,
                 tta: int):
        from qgseg.engine import resolve_device

        self.cfg, self.data, self.source, self.base = cfg, data, source, base
        self.budget, self.n_rounds, self.tta = budget, rounds, tta
        self.device = resolve_device(cfg.device)
        self.scored: dict[tuple[str, tuple[str, ...]], pd.DataFrame] = {}  # round 1 of every strategy scores one pool

    def view(self, folder: Path, train: Sequence[str]) -> Path:
        return data_view(folder / "data", self.source, {"train": train, "val": self.base["val"],
                                                        "test": self.base["test"]})

    def picks(self, rd: Path, prev: Path, labeled_now: Sequence[str], strategy: str, seed: int, r: int,
              g: Any) -> pd.DataFrame:
        """The round's picks.csv: every pool image's scores and true Dice, ``picked`` marking the budget."""
        from qgseg.runs import atomic_write_text

        path = rd / "picks.csv"
        if not path.is_file():
            pool = sorted(set(self.base["train"]) - set(labeled_now))
            key = (str(prev), tuple(pool))
            if key not in self.scored:  # every signal, for the Spearman columns
                self.scored = {key: _score_pool(prev, self.data, pool, g, self.tta, self.device)}
            table = self.scored[key].copy()
            table["picked"] = False
            table.loc[table.index[pick(table, strategy, self.budget, seed=1000 * seed + r)], "picked"] = True
            rd.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, table.to_csv(index=False))
        return pd.read_csv(path, dtype={"stem": str})  # a fresh and a resumed round read the same numbers

    def rounds(self, sd: Path, seed: int, strategy: str, start: Sequence[str], g: Any) -> list[dict[str, Any]]:
        labeled_now, prev, rows = list(start), sd / "round0" / "run", []
        if g is not None:
            g.to(self.device)
        for r in range(1, self.n_rounds + 1):
            rd = sd / strategy / f"round{r}"
            table = self.picks(rd, prev, labeled_now, strategy, seed, r, g)
            picked = table["picked"].astype(bool)
            labeled_now = sorted(set(labeled_now) | set(table.loc[picked, "stem"]))
            log.info("seed %d, %s, round %d: %d labeled images (picked true Dice %.3f vs pool %.3f)", seed, strategy,
                     r, len(labeled_now), table.loc[picked, "true_dice"].mean(), table["true_dice"].mean())
            summary = _train_sup(self.cfg, self.view(rd, labeled_now), rd / "run", seed)
            rows.append(_row(seed, strategy, r, len(labeled_now), summary, rd / "run", table))
            prev = rd / "run"
        return rows


def _config_digest(cfg: Any) -> str:
    """What every training of the simulation shares (the settings of sup and g), as a short hash."""
    import hashlib

    from qgseg.config import dumps_toml

    common = cfg.replace(**{"data.labeled": "", "seed": 0, "runs_root": "", "device": "auto"})
    return hashlib.sha1(dumps_toml(common).encode()).hexdigest()[:12]


def _row(seed: int, strategy: str, r: int, n: int, summary: dict[str, Any], run: Path,
         table: pd.DataFrame | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {"seed": seed, "strategy": strategy, "round": r, "labeled": n,
                           "test_dsc": summary.get("test_dsc"), "test_iou": summary.get("test_iou"),
                           "picked_true_dice": None, "pool_true_dice": None, "run": str(run)}
    if table is not None:
        picked = table["picked"].astype(bool)
        row["picked_true_dice"] = float(table.loc[picked, "true_dice"].mean())
        row["pool_true_dice"] = float(table["true_dice"].mean())
        for s in SIGNALS:  # how well each signal ranked this pool (Spearman with the true Dice)
            v = table[s].astype(float)
            row[f"spearman_{s}"] = (float(v.corr(table["true_dice"], method="spearman"))
                                    if v.notna().sum() > 2 and v.std() > 0 else None)
    return row


def aggregate(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Mean ± s.e. over seeds of test DSC per strategy and round."""
    from qgseg.metrics import mean_se

    out = []
    for (strategy, r), grp in frame.groupby(["strategy", "round"], sort=False):
        m, se = mean_se(grp["test_dsc"].astype(float).to_numpy())
        pm, _ = mean_se(grp["picked_true_dice"].astype(float).to_numpy())
        out.append({"strategy": strategy, "round": int(r), "labeled": int(grp["labeled"].iloc[0]),
                    "seeds": int(len(grp)), "test_dsc": m, "test_dsc_se": se,
                    "picked_true_dice": None if np.isnan(pm) else pm})
    return out


def gains(frame: pd.DataFrame) -> dict[str, Any]:
    """Each strategy's test DSC minus random's at the last round, paired by seed (mean ± s.e.)."""
    from qgseg.metrics import mean_se

    if "random" not in set(frame["strategy"]):
        return {}
    last = frame["round"].max()
    end = frame[frame["round"] == last].pivot_table(index="seed", columns="strategy", values="test_dsc")
    out = {}
    for s in end.columns:
        if s != "random":
            m, se = mean_se((end[s] - end["random"]).to_numpy(dtype=float))
            out[s] = {"mean": m, "se": se, "seeds": int((end[s] - end["random"]).notna().sum())}
    return out
