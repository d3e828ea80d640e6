"""``qgseg demo``: the whole pipeline on the built-in synthetic data, in-process, in a few minutes.

synth -> train-weak -> train-quality -> ssl (sup, pl, pl + QW, mt, mt + QW, qar) -> evaluate,
then a Table-1-style comparison. Everything goes under one folder (default ``runs/demo``):
``data/`` (the synthetic set), ``train-weak/weak/``, ``train-quality/g/``, ``ssl/<row>/`` (normal
run directories under the runs root ``DIR``; each ssl run's evaluation in ``eval/test/``), ``table.md``, ``table.csv`` and
``summary.json``. Rerunning the demo on the same folder reuses completed runs and resumes
unfinished ones.
"""
from __future__ import annotations

import csv
import io
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

from qgseg.config import Config, Loaded, dumps_toml, method_settings
from qgseg.errors import InputError
from qgseg.report import Reporter, mean_se_str
from qgseg.runs import Run, atomic_write_text, json_ready, read_json, write_json

log = logging.getLogger("qgseg")

# (ssl.method, ssl.qw) rows of the comparison, in the paper's Table 1 order
DEMO_ROWS: tuple[tuple[str, bool], ...] = (("sup", False), ("pl", False), ("pl", True), ("mt", False),
                                           ("mt", True), ("qar", False))
N_LABELED, N_UNLABELED = 60, 80


class _StageReporter(Reporter):
    """A stage's progress bar drawn inside the demo's own progress display (one live display)."""

    def __init__(self, shared: Any, quiet: bool):
        super().__init__(enabled=False, quiet=quiet)
        self._shared = shared

    def __enter__(self) -> "_StageReporter":
        self._progress, self._task = self._shared, None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.remove_task(self._task)
        self._progress, self._task = None, None


class _Display:
    """The demo's progress: an overall bar over the steps plus the running stage's bar."""

    def __init__(self, total: int, enabled: bool, quiet: bool):
        self.quiet = quiet
        self.total = total
        self.done = 0
        self.progress = None
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            from qgseg.report import stderr_console

            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                     console=stderr_console())
            self.task = self.progress.add_task("demo", total=total, info="")

    def __enter__(self) -> "_Display":
        if self.progress is not None:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def stage(self) -> Reporter:
        return _StageReporter(self.progress, self.quiet)

    def begin(self, what: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, info=what)
        elif not self.quiet:
            log.info("demo [%d/%d] %s", self.done + 1, self.total, what)

    def end(self, message: str) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress.update(self.task, advance=1)
            self.progress.console.print(message, markup=False, highlight=False)
        elif not self.quiet:
            log.info("demo [%d/%d] %s", self.done, self.total, message)


def _row_name(method: str, qw: bool) -> str:
    return method + ("-qw" if qw else "")


def _same_config(run_dir: Path, cfg: Config) -> bool:
    def strip(text: str) -> list[str]:
        return [ln for ln in text.splitlines() if not ln.startswith("device =")]

    try:
        return strip((run_dir / "config.toml").read_text(encoding="utf-8")) == strip(dumps_toml(cfg))
    except OSError:
        return False


def _stage(fn: Callable[..., tuple[Run, dict]], loaded: Loaded, path: Path, rep: Reporter) -> tuple[Run, dict, str]:
    """Run a stage into ``path``: reuse it when completed, resume it when unfinished."""
    if (path / "meta.json").is_file():
        run = Run(path)
        if not _same_config(path, loaded.config):
            raise InputError(f"--out: {path} was made with other settings; choose another "
                             "--out (or delete that folder)")
        if run.status == "completed":
            return run, run.summary, "reused"
        r, s = fn(loaded, out=path, resume=True, reporter=rep)
        return r, s, "resumed"
    r, s = fn(loaded, out=path, reporter=rep)
    return r, s, "trained"


def _synth(out: Path, n_labeled: int, n_unlabeled: int, size: int, seed: int) -> Path:
    """The synthetic data set, written once per set of arguments."""
    from qgseg.synth import generate

    data = out / "data"
    want = {"labeled": n_labeled, "unlabeled": n_unlabeled, "size": size, "seed": seed}
    marker = data / "synth.json"
    try:
        if read_json(marker) == want:
            return data
    except (OSError, ValueError):
        pass
    generate(data, n_labeled=n_labeled, n_unlabeled=n_unlabeled, size=size, seed=seed)
    write_json(marker, want)
    return data


def run_demo(loaded: Loaded, out: Path | str | None = None, n_labeled: int = N_LABELED,
             n_unlabeled: int = N_UNLABELED, rows: tuple[tuple[str, bool], ...] = DEMO_ROWS,
             progress: bool | None = None, quiet: bool = False) -> dict[str, Any]:
    """The whole pipeline on synthetic data; returns the comparison (also written to ``out``).

    Longer than most functions on purpose: it is the pipeline's stages in order, each a few lines
    under the progress display, and reads best as one script.
    """
    import sys

    from qgseg.evaluate import run_evaluate
    from qgseg.ssl import run_ssl
    from qgseg.train_quality import run_train_quality
    from qgseg.weak import run_train_weak

    t_start = time.time()
    base = loaded.config
    out = Path(out) if out else Path(base.runs_root) / "demo"
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    enabled = (sys.stderr.isatty() and not quiet) if progress is None else progress
    steps = 3 + len(rows) + 1
    timings: dict[str, float] = {}
    with _Display(steps, enabled, quiet) as ui:
        ui.begin("synthetic data")
        t = time.time()
        data = _synth(out, n_labeled, n_unlabeled, base.data.image_size, base.seed)
        timings["synth"] = time.time() - t
        ui.end(f"synthetic data: {n_labeled} labeled + {n_unlabeled} unlabeled images at {base.data.image_size} px "
               f"in {data} ({timings['synth']:.1f} s)")
        common = {"data.labeled": str(data / "labeled"), "data.unlabeled": str(data / "unlabeled"),
                  "runs_root": str(out)}
        cfg = base.replace(**common)

        def loaded_for(c: Config) -> Loaded:
            explicit = dict(loaded.explicit)
            explicit.update({k: "demo" for k in common})
            return Loaded(c, explicit, loaded.config_file)

        ui.begin("train-weak")
        t = time.time()
        weak_run, _, how = _stage(run_train_weak, loaded_for(cfg), out / "train-weak" / "weak", ui.stage())
        timings["train-weak"] = time.time() - t
        ui.end(f"train-weak {how}: {weak_run.path} ({timings['train-weak']:.1f} s)")

        ui.begin("train-quality")
        t = time.time()
        qcfg = cfg.replace(**{"weak.run": str(weak_run.path)})
        q_run, q_sum, how = _stage(run_train_quality, loaded_for(qcfg), out / "train-quality" / "g", ui.stage())
        timings["train-quality"] = time.time() - t
        g_text = _g_text({"quality_test_mae": q_sum.get("test_mae"), "quality_test_pearson": q_sum.get("test_pearson")})
        ui.end(f"train-quality {how}: g {g_text} ({timings['train-quality']:.1f} s)")

        ssl_runs: list[tuple[str, bool, Run]] = []
        for method, qw in rows:
            name = _row_name(method, qw)
            ui.begin(f"ssl {name}")
            t = time.time()
            scfg = cfg.replace(**{**method_settings(method, cfg), "ssl.qw": qw, "ssl.quality": str(q_run.path)})
            run, s, how = _stage(run_ssl, loaded_for(scfg), out / "ssl" / name, ui.stage())
            timings[f"ssl {name}"] = time.time() - t
            ssl_runs.append((method, qw, run))
            ui.end(f"ssl {name} {how}: test DSC {s.get('test_dsc') or float('nan'):.4f} "
                   f"({timings[f'ssl {name}']:.1f} s)")

        ui.begin("evaluate")
        t = time.time()
        table = []
        for method, qw, run in ssl_runs:
            _, ev = run_evaluate(loaded_for(cfg), run.path, quality=str(q_run.path))
            table.append(_row(method, qw, run, ev))
        timings["evaluate"] = time.time() - t
        ui.end(f"evaluated {len(ssl_runs)} ssl runs on their test split ({timings['evaluate']:.1f} s)")

    first = ssl_runs[0][2].summary if ssl_runs else {}
    summary: dict[str, Any] = {
        "out": str(out), "data": str(data), "image_size": base.data.image_size,
        "n_labeled": n_labeled, "n_unlabeled": n_unlabeled,
        "n_train": first.get("n_train"), "n_test": first.get("n_test"),
        "weak_run": str(weak_run.path), "quality_run": str(q_run.path),
        "quality_test_mae": q_sum.get("test_mae"), "quality_test_pearson": q_sum.get("test_pearson"),
        "rows": paired_to_sup(table), "seconds": round(time.time() - t_start, 1),
        "stage_seconds": {k: round(v, 1) for k, v in timings.items()},
    }
    summary["reading"] = reading(summary)
    summary = json_ready(summary)
    _write_outputs(out, summary)
    return summary


def _row(method: str, qw: bool, run: Run, ev: dict[str, Any]) -> dict[str, Any]:
    def num(k: str) -> float:
        v = ev.get(k)
        return float(v) if isinstance(v, (int, float)) else math.nan

    return {"method": method, "qw": qw, "dsc": num("dsc"), "dsc_se": num("dsc_se"), "iou": num("iou"),
            "iou_se": num("iou_se"), "hd95": num("hd95"), "hd95_se": num("hd95_se"),
            "hd95_undefined": ev.get("hd95_undefined", 0), "pred_quality": num("pred_quality"),
            "quality_pearson": num("quality_pearson"), "cases": ev.get("cases"), "run": str(run.path),
            "eval": ev.get("out", "")}


def _case_dsc(run_dir: str) -> dict[str, float]:
    """stem -> test DSC of an ssl run (its test_cases.csv)."""
    with open(Path(run_dir) / "test_cases.csv", newline="", encoding="utf-8") as f:
        return {r["stem"]: float(r["dsc"]) for r in csv.DictReader(f) if r.get("dsc") not in ("", None)}


def paired_to_sup(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row with d_dsc / d_dsc_se: the mean and s.e. over test images of its DSC minus the
    supervised row's DSC on the same image (NaN for the supervised row, or without one)."""
    from qgseg.metrics import mean_se

    sup = next((r for r in rows if r["method"] == "sup" and not r["qw"]), None)
    base = _case_dsc(sup["run"]) if sup is not None else {}
    out = []
    for r in rows:
        diffs = []
        if r is not sup and base:
            mine = _case_dsc(r["run"])
            diffs = [mine[k] - base[k] for k in base if k in mine and not math.isnan(mine[k] - base[k])]
        m, se = mean_se(diffs)
        out.append({**r, "d_dsc": m, "d_dsc_se": se})
    return out


def reading(summary: dict[str, Any]) -> str:
    """One line on what the demo's numbers mean, from the numbers."""
    rows = [r for r in summary["rows"] if isinstance(r.get("d_dsc"), float) and not math.isnan(r["d_dsc"])]
    if not rows:
        return "No supervised row to compare with: each row's test DSC is one training seed on synthetic data."
    bar = 2 * sorted(r["d_dsc_se"] for r in rows)[len(rows) // 2]
    beyond = [f"{method_label(r['method'])}{'+QW' if r['qw'] else ''} {r['d_dsc']:+.3f}" for r in rows
              if abs(r["d_dsc"]) > bar]
    return (f"What the numbers mean: one training seed of f on {summary['n_train']} labeled + "
            f"{summary['n_unlabeled']} unlabeled synthetic images; Δ DSC is a row's test DSC minus Supervised's on "
            f"the same {summary['n_test']} test images, and |Δ| under ~{bar:.3f} (2 s.e.) is noise here "
            f"(beyond it: {', '.join(beyond) or 'none'}); whether QW or QAR helps on real data takes seeds: "
            "qgseg ablate labels (docs/results.md).")


def method_label(name: str) -> str:
    """A method's name in tables (``Method.label``); an unknown name as it is."""
    from qgseg.methods import get_method, method_names

    return get_method(name).label if name in method_names() else name


def display_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    def f(v: Any) -> float:
        return float(v) if isinstance(v, (int, float)) else math.nan

    def delta(r: dict[str, Any]) -> str:
        d, se = f(r.get("d_dsc")), f(r.get("d_dsc_se"))
        return "-" if math.isnan(d) else f"{d:+.4f} ± {se:.4f}"

    head = ["method", "QW", "test DSC", "Δ DSC vs sup", "test IoU", "test HD95 (px)", "r(g, DSC)", "run"]
    body = []
    for r in summary["rows"]:
        corr = f(r["quality_pearson"])
        body.append([method_label(r["method"]), "✓" if r["qw"] else "",
                     mean_se_str(f(r["dsc"]), f(r["dsc_se"])), delta(r), mean_se_str(f(r["iou"]), f(r["iou_se"])),
                     mean_se_str(f(r["hd95"]), f(r["hd95_se"]), 2), "-" if math.isnan(corr) else f"{corr:.3f}",
                     _relative(r["run"], summary["out"])])
    return head, body


def _write_outputs(out: Path, summary: dict[str, Any]) -> None:
    head, body = display_rows(summary)
    md = ["# qgseg demo", "", f"Synthetic data at {summary['image_size']} px: {summary['n_labeled']} labeled "
          f"({summary['n_train']} of them train f and g), {summary['n_unlabeled']} unlabeled images. Test metrics: "
          "mean ± standard error over test cases; Δ DSC vs sup: over the per-image differences.",
          f"g: {summary['quality_run']} ({_g_text(summary)}).", "",
          "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    md += ["| " + " | ".join(line) + " |" for line in body]
    md += ["", summary.get("reading", "")]
    atomic_write_text(out / "table.md", "\n".join(md) + "\n")
    buf = io.StringIO()
    cols = list(summary["rows"][0]) if summary["rows"] else []
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in summary["rows"]:
        w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    atomic_write_text(out / "table.csv", buf.getvalue())
    write_json(out / "summary.json", json_ready(summary))


def render(summary: dict[str, Any]) -> Any:
    """Rich output: the comparison table and where everything is."""
    from rich.console import Group
    from rich.table import Table

    head, body = display_rows(summary)
    t = Table(title=f"qgseg demo: test results on synthetic data ({summary['image_size']} px; mean ± s.e. over "
              "test cases)", caption="Δ DSC vs sup: mean ± s.e. of the per-image difference to Supervised; "
              "r(g, DSC): Pearson correlation of g(x, prediction) with the true DSC",
              header_style="bold")
    for h in head:
        t.add_column(h, justify="left" if h in ("method", "QW", "run") else "right", overflow="fold")
    for line in body:
        t.add_row(*line)
    lines = [summary.get("reading", ""), f"g (quality predictor): {summary['quality_run']}  {_g_text(summary)}",
             f"weak U-Net (Type 2 masks): {summary['weak_run']}",
             f"runs: {summary['out']}   table: {Path(summary['out']) / 'table.md'}   total {summary['seconds']:.0f} s"]
    return Group(t, *lines)


def _g_text(summary: dict[str, Any]) -> str:
    mae, r = summary.get("quality_test_mae"), summary.get("quality_test_pearson")
    return (f"test MAE {mae:.3f}" if isinstance(mae, float) else "test MAE -") + ", " + (
        f"Pearson {r:.3f}" if isinstance(r, float) else "Pearson -")


def _relative(path: str, root: str) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return path
