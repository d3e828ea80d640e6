"""Accuracy per minute of g: test MAE and Pearson after every epoch of one train-quality run.

Runs ``train-quality`` (default: the cpu preset on PH2) in this process and, after each epoch's
validation, scores the test split's corrupted masks with g as it scores (its ``tta_views``),
recording the run's cumulative CPU and wall time up to that point (D_Q, the lesion-free images,
training and the per-epoch validation, i.e. what the run would have cost if stopped there; the
extra test scoring is not counted). Writes a CSV and JSON next to ``--out`` and a PNG plot.

    OMP_NUM_THREADS=1 python benchmarks/quality_curve.py --labeled ../shared/data/ph2 \
        --out quality_curve.json --plot docs/quality_curve.png

One cpu-preset run is ~10 epochs; each point is that run cut at an epoch, not a shorter run (whose
cosine schedule would end sooner), so the curve is a lower bound of what fewer epochs reach.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--labeled", type=Path, default=REPO.parent / "shared" / "data" / "ph2")
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="config overrides, as the CLI's --set")
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write (a .csv is written beside it)")
    ap.add_argument("--plot", type=Path, default=None, help="PNG of the curve")
    ap.add_argument("--runs", type=Path, default=None, help="run folder (default: a temporary one, removed)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from qgseg.config import load_config
    from qgseg.metrics import regression_metrics
    from qgseg.quality import predict_quality
    from qgseg.report import Reporter, setup_logging
    from qgseg.train_quality import QualityTask, run_train_quality

    setup_logging(quiet=True)
    tmp = None
    if args.runs is None:
        tmp = tempfile.TemporaryDirectory(prefix="qgseg-curve-")
        args.runs = Path(tmp.name)
    # runs_root: no train-weak run is found there, so D_Q has Type 1 masks only
    loaded = load_config(preset=args.preset, options={"data.labeled": str(args.labeled), "device": "cpu",
                                                      "runs_root": str(args.runs)},
                         sets=args.sets, cwd=Path(tempfile.gettempdir()))
    points: list[dict] = []
    clock = {"cpu": time.process_time(), "wall": time.perf_counter(), "cpu_skip": 0.0, "wall_skip": 0.0}
    evaluate = QualityTask.evaluate

    def evaluate_and_test(task: QualityTask, epoch: int) -> dict[str, float]:
        row = evaluate(task, epoch)  # the run's own validation: part of its cost
        c0, w0 = time.process_time(), time.perf_counter()
        cpu, wall = c0 - clock["cpu"] - clock["cpu_skip"], w0 - clock["wall"] - clock["wall_skip"]
        test = task.sets["test"]
        pred = predict_quality(task.g, task.images, task.case_index["test"], test, task.device)
        r = regression_metrics(pred, test.dice.astype(np.float64))
        points.append({"epoch": epoch, "cpu_s": round(cpu, 1), "wall_s": round(wall, 1),
                       "test_mae": r["mae"], "test_pearson": r["pearson"], "val_mae": row.get("val_mae"),
                       "masks_seen": epoch * task.steps_per_epoch() * task.bs})
        print(f"[curve] epoch {epoch}: {cpu:.0f} CPU-s, {wall:.0f} wall-s, test MAE {r['mae']:.4f}, "
              f"Pearson {r['pearson']:.4f}", file=sys.stderr, flush=True)
        clock["cpu_skip"] += time.process_time() - c0
        clock["wall_skip"] += time.perf_counter() - w0
        return row

    QualityTask.evaluate = evaluate_and_test
    try:
        run, summary = run_train_quality(loaded, out=args.runs / "tq", reporter=Reporter(quiet=True))
    finally:
        QualityTask.evaluate = evaluate
    cfg = loaded.config
    result = {"preset": args.preset, "sets": args.sets, "data": args.labeled.name, "torch_threads": torch.get_num_threads(),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS", ""), "loadavg_end": os.getloadavg()[0],
              "epochs": cfg.quality.epochs, "tta_views": cfg.quality.tta_views, "points": points,
              "final": {k: summary.get(k) for k in ("test_mae", "test_pearson", "best_epoch", "train_seconds")}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    import pandas as pd

    pd.DataFrame(points).to_csv(args.out.with_suffix(".csv"), index=False)
    if args.plot:
        plot(result, args.plot)
    if tmp is not None:
        tmp.cleanup()
    print(f"wrote {args.out}" + (f" and {args.plot}" if args.plot else ""))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = result["points"]
    minutes = [p["cpu_s"] / 60 for p in pts]
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=120)
    ax.plot(minutes, [p["test_mae"] for p in pts], "o-", color="tab:red", label="test MAE")
    ax.set_xlabel(f"CPU minutes of the run (torch threads {result['torch_threads']})")
    ax.set_ylabel("test MAE", color="tab:red")
    ax.set_xlim(left=0)
    ax2 = ax.twinx()
    ax2.plot(minutes, [p["test_pearson"] for p in pts], "s--", color="tab:blue", label="test Pearson")
    ax2.set_ylabel("test Pearson", color="tab:blue")
    for p, x in zip(pts, minutes):
        ax.annotate(str(p["epoch"]), (x, p["test_mae"]), textcoords="offset points", xytext=(0, 6),
                    ha="center", fontsize=7, color="tab:red")
    ax.set_title(f"g, {result['preset']} preset on {result['data']}: accuracy vs training time (epochs marked)",
                 fontsize=9)
    ax.grid(alpha=0.3)
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [ln.get_label() for ln in lines], loc="center right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
