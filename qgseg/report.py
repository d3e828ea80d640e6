"""Console output: result tables on stdout, progress and logs on stderr, JSON for scripts."""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from typing import Any, Iterable, Mapping, Sequence

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

log = logging.getLogger("qgseg")


def stdout_console() -> Console:
    return Console(file=sys.stdout, soft_wrap=False)


def stderr_console() -> Console:
    return Console(file=sys.stderr, stderr=True)


def setup_logging(quiet: bool = False, debug: bool = False) -> None:
    """Logs go to stderr; ``--quiet`` keeps warnings and errors only."""
    level = logging.DEBUG if debug else (logging.WARNING if quiet else logging.INFO)
    for h in list(log.handlers):
        log.removeHandler(h)
    if sys.stderr.isatty():
        handler: logging.Handler = RichHandler(console=stderr_console(), show_path=False,
                                               show_time=False, markup=False)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False


def print_json(obj: Any) -> None:
    """Exactly one JSON document on stdout."""
    from qgseg.runs import json_safe

    clean, _ = json_safe(obj)  # strict JSON: NaN / infinity are null (summaries say why under "undefined")
    sys.stdout.write(json.dumps(clean, indent=2, default=_default, allow_nan=False) + "\n")
    sys.stdout.flush()


def _default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def fmt(v: Any, digits: int = 4) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3g}"
        return f"{v:.{digits}f}"
    return str(v)


_WORDS = {"mae": "MAE", "rmse": "RMSE", "dsc": "DSC", "iou": "IoU", "hd95": "HD95", "ge": ">=", "se": "s.e.",
          "qw": "QW", "qar": "QAR", "dq": "D_Q", "tta": "TTA", "pearson": "Pearson r", "spearman": "Spearman rho",
          "p": "p-value"}


def label(key: str) -> str:
    """A summary key as a table label: ``test_mae_dice_ge_0.7`` -> ``test MAE dice >= 0.7``; keys
    that are not snake_case are shown as they are."""
    if "_" not in key:
        return key
    return " ".join(_WORDS.get(w, w) for w in key.split("_") if w)


def fmt_value(key: str, v: Any) -> str:
    """fmt, plus units a key implies (``*seconds``: "5.3 s") and "undefined" for a missing value."""
    if v is None:
        return "undefined"
    if key.endswith("seconds") and isinstance(v, (int, float)) and not isinstance(v, bool):
        return f"{v:.1f} s"
    return fmt(v)


def kv_table(title: str, items: Mapping[str, Any]) -> Table:
    t = Table(title=title, show_header=True, header_style="bold")
    t.add_column("key")
    t.add_column("value", overflow="fold")
    for k, v in items.items():
        if isinstance(v, Mapping):
            v = ", ".join(f"{a}: {fmt_value(str(a), b)}" for a, b in v.items())
        elif isinstance(v, (list, tuple)):
            v = ", ".join(fmt(x) for x in v)
        t.add_row(label(str(k)), fmt_value(str(k), v))
    return t


def rows_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Table:
    t = Table(title=title, show_header=True, header_style="bold")
    for c in columns:
        t.add_column(str(c), justify="right" if c not in (columns[0],) else "left")
    for r in rows:
        t.add_row(*[fmt(x) for x in r])
    return t


def mean_se_str(mean: float, se: float, digits: int = 4) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "nan"
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


class Reporter:
    """Progress for training loops: a Rich bar with ETA on a TTY, one log line per epoch otherwise."""

    def __init__(self, enabled: bool | None = None, quiet: bool = False):
        if enabled is None:
            enabled = sys.stderr.isatty() and not quiet
        self.enabled = enabled
        self.quiet = quiet
        self._progress: Progress | None = None
        self._task = None
        self._t0 = time.time()

    def __enter__(self) -> "Reporter":
        if self.enabled:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                console=stderr_console(), transient=False)
            self._progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
            self._progress = None

    def start(self, description: str, total: int, completed: int = 0, epochs: int = 0, unit: str = "steps") -> None:
        """A bar of ``total`` steps (or other ``unit``); ``epochs`` > 0: the steps are that many epochs' worth."""
        self._t0 = time.time()
        if self._progress is not None:
            if self._task is not None:
                self._progress.remove_task(self._task)
            self._task = self._progress.add_task(description, total=total, completed=completed, info="")
        elif not self.quiet:
            if epochs:
                log.info("%s: %d epochs of %d steps (%d steps in all)", description, epochs,
                         total // max(epochs, 1), total)
            else:
                log.info("%s: %d %s", description, total, unit)

    def advance(self, n: int = 1, info: str = "") -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, advance=n, info=info)

    def note(self, message: str) -> None:
        """One line per epoch (or other milestone)."""
        if self._progress is not None:
            self._progress.console.print(message, markup=False, highlight=False)
        elif not self.quiet:
            log.info(message)
