"""``qgseg ablate NAME``: sweep one setting over a grid of values x seeds, then tabulate.

Every point is a normal run directory, ``<ablate>/points/<value>/seed<k>/`` (the ``labels`` sweep
adds a method level: ``<ablate>/points/<value>/<method>/seed<k>/``), made by a child
process ``python -m qgseg <stage> --config <ablate>/config.toml --out <point> --set key=value
--seed k --json`` (``--resume`` when the point holds an unfinished run). Rerunning the same
command skips completed points, so an interrupted sweep continues where it stopped; with
``--print-commands`` the points become shell lines for a cluster job array and a later plain
``qgseg ablate`` gathers them into the table.

Phase 2 sweeps (ssl points) share one g: ``--quality RUN``, the g this ablate used before, the
newest completed train-quality run of the same image size, or one trained into
``<ablate>/prereq/train-quality``. Phase 1 sweeps (train-quality points) share one train-weak
run for Type 2 masks when p_weak > 0 (found, or trained into ``<ablate>/prereq/train-weak``).
"""
from __future__ import annotations

import concurrent.futures as cf
import csv
import io
import logging
import math
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from qgseg.config import Config, Loaded, dumps_toml, load_run_config, method_settings
from qgseg.errors import InputError, QgsegError
from qgseg.metrics import e_val, mean_se
from qgseg.report import Reporter
from qgseg.runs import Run, atomic_write_text, find_runs, read_json, resolve_link

log = logging.getLogger("qgseg")
STAGE = "ablate"
LIVE_SECONDS = 600  # a "running" point touched this recently is taken to be running elsewhere


@dataclass(frozen=True)
class Sweep:
    """One ablation: which stage its points run, the key it varies and its default grid."""

    name: str
    stage: str  # "ssl" or "train-quality"
    key: str  # dotted config key the value sets ("" for the method sweep)
    grid: tuple[str, ...] | Callable[[], tuple[str, ...]]  # the default grid, or what makes it
    help: str
    metrics: tuple[tuple[str, str], ...] = ()  # (summary key, column name)
    e_val96: bool = False
    methods: tuple[str, ...] = ()  # a second dimension: SSL methods at every value (``--methods``)
    paired: str = ""  # what each row is compared with, paired by seed: "sup" (the sup row), "zero" (the 0 value)

    @property
    def default(self) -> tuple[str, ...]:
        return self.grid() if callable(self.grid) else self.grid


def method_rows() -> tuple[str, ...]:
    """Every registered method, and method+qw after each one with pseudolabels for g to weight."""
    from qgseg.methods import get_method, method_names

    return tuple(x for m in method_names() for x in ((m, f"{m}+qw") if get_method(m).pseudolabel else (m,)))


_P2 = (("test_dsc", "DSC"), ("test_iou", "IoU"))
_P1 = (("test_mae", "MAE"), ("test_pearson", "Pearson"))

SWEEPS: dict[str, Sweep] = {s.name: s for s in (
    Sweep("lambda-qar", "ssl", "ssl.qar_weight", ("0", "0.001", "0.01", "0.1"),
          "final QAR weight lambda_qar (method qar unless ssl.method is set; 0 = the method without QAR, "
          "sup for qar)", _P2, paired="zero"),
    Sweep("lambda-qw", "ssl", "ssl.lambda_final", ("0", "0.1", "0.25", "0.5", "1.0"),
          "final unlabeled-loss weight of a QW method (pl --qw unless ssl.method is set; 0 = no unlabeled "
          "term: sup)", _P2, paired="zero"),
    Sweep("p-weak", "train-quality", "corrupt.p_weak", ("0", "0.05", "0.1", "0.2"),
          "probability of a Type 2 (weak-model) mask in D_Q", _P1),
    Sweep("k", "train-quality", "corrupt.k", ("10", "25", "50", "100"), "corrupted masks per training image K", _P1),
    Sweep("backbone", "train-quality", "quality.backbone", ("resnet18", "resnet34", "resnet50"),
          "timm backbone of g", _P1),
    Sweep("arch", "ssl", "model.arch", ("unetpp", "attention-unet", "swin-unet"),
          "architecture of f, with its default encoder (arch:encoder picks one; method qar unless "
          "ssl.method is set)", _P2),
    Sweep("unlabeled-size", "ssl", "data.max_unlabeled", ("25%", "50%", "100%"),
          "unlabeled images M (a count, or a percentage of the unlabeled folder; method qar unless "
          "ssl.method is set)", _P2, e_val96=True),
    Sweep("method", "ssl", "", method_rows, "every SSL method with and without QW (the paper's Table 1 rows)", _P2,
          paired="sup"),
    Sweep("labels", "ssl", "data.max_labeled", ("14", "28", "70"),
          "labeled training images (data.max_labeled, 0 = all) x SSL methods", _P2, methods=("sup", "pl", "mt"),
          paired="sup"),
)}


@dataclass
class Point:
    value: str
    seed: int
    path: Path
    sets: list[str]
    status: str = "pending"  # pending, completed, failed, running
    reason: str = ""
    summary: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. e_val96
    method: str = ""  # the labels sweep's second dimension ("" elsewhere)

    @property
    def label(self) -> str:
        return f"{self.value}{' ' + self.method if self.method else ''} seed {self.seed}"

    @property
    def log_name(self) -> str:
        return f"{slug(self.value)}{'-' + slug(self.method) if self.method else ''}-seed{self.seed}.log"


def get_sweep(name: str) -> Sweep:
    if name not in SWEEPS:
        raise InputError(f"NAME {name}: unknown ablation; choose one of {', '.join(SWEEPS)}")
    return SWEEPS[name]


def slug(value: str) -> str:
    """A folder name for a grid value: ``25%`` -> ``25pct``, ``pl+qw`` -> ``pl+qw``."""
    s = value.strip().replace("%", "pct").replace("/", "_").replace(":", "_")
    s = re.sub(r"[^A-Za-z0-9.+=_-]", "_", s)
    return s or "_"


def parse_values(text: str | None, sweep: Sweep, option: str = "--values") -> list[str]:
    default = sweep.default if option == "--values" else sweep.methods
    if text is None:
        return list(default)
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise InputError(f"{option} {text!r}: expected comma-separated values, e.g. {','.join(default)}")
    slugs = [slug(v) for v in values]
    if len(set(slugs)) != len(slugs):
        raise InputError(f"{option} {text!r}: a value is listed twice")
    return values


def parse_methods(text: str | None, sweep: Sweep) -> list[str]:
    """The methods dimension: the labels sweep's (default sup, pl, mt); other sweeps have none."""
    if not sweep.methods:
        if text is not None:
            raise InputError(f"--methods: the {sweep.name} sweep has no methods dimension (only labels has); "
                             "use --set ssl.method=NAME")
        return [""]
    return parse_values(text, sweep, "--methods")


def is_zero(value: str) -> bool:
    """Whether a grid value is the number 0 (``0``, ``0.0``, ``0e0``)."""
    try:
        return float(value) == 0.0
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------
# what a value sets
# ---------------------------------------------------------------------------------------------
def _unlabeled_count(cfg: Config) -> int:
    from qgseg.data import discover_unlabeled

    if not cfg.data.unlabeled:
        raise InputError("--unlabeled: the unlabeled-size sweep needs an unlabeled folder (data.unlabeled)")
    return len(discover_unlabeled(Path(cfg.data.unlabeled)))


def point_sets(sweep: Sweep, value: str, cfg: Config, explicit: dict[str, str],
               unlabeled_count: Callable[[], int]) -> list[str]:
    """The ``--set key=value`` items of one grid value (values are passed on unchecked: a bad
    value makes that point's run fail, and the table says so)."""
    from qgseg.methods import method_names

    method_given = "ssl.method" in explicit
    if sweep.name == "method":
        return method_sets(value, cfg)
    out: list[str] = []
    if sweep.name == "lambda-qar":
        method = cfg.ssl.method if method_given else "qar"
        if is_zero(value):  # the method with the QAR term off; for qar that is sup
            base = "sup" if method == "qar" or method not in method_names() else method
            return [f"{k}={v}" for k, v in {**method_settings(base, cfg), "ssl.qar_weight": 0.0}.items()]
        if not method_given:
            out.append("ssl.method=qar")
        out.append(f"ssl.qar_weight={value}")
    elif sweep.name == "lambda-qw":
        if is_zero(value):  # lambda scales the whole unlabeled term: 0 is the supervised baseline
            return ["ssl.method=sup", "ssl.qw=false", "ssl.lambda_final=0.0"]
        if not method_given:
            out.append("ssl.method=pl")
        out += ["ssl.qw=true", f"ssl.lambda_final={value}"]
    elif sweep.name == "arch":
        arch, _, encoder = value.partition(":")
        out += _default_method(cfg, method_given) + [f"model.arch={arch}", f"model.encoder={encoder}"]
    elif sweep.name == "unlabeled-size":
        out += _default_method(cfg, method_given)
        if value.endswith("%"):
            try:
                frac = float(value[:-1]) / 100.0
            except ValueError:
                return out + [f"data.max_unlabeled={value}"]
            n = unlabeled_count()
            m = 0 if frac >= 1.0 else max(1, int(round(frac * n)))
            out.append(f"data.max_unlabeled={m}")
        else:
            out.append(f"data.max_unlabeled={value}")
    else:
        out.append(f"{sweep.key}={value}")
    return out


def method_sets(value: str, cfg: Config) -> list[str]:
    """The ``--set`` items of a method value: ``NAME`` or ``NAME+qw`` (the method and labels sweeps)."""
    from qgseg.methods import method_names

    method, _, flag = value.partition("+")
    if flag not in ("", "qw"):
        return [f"ssl.method={value}"]  # let the point's run reject it
    qw = f"ssl.qw={'true' if flag else 'false'}"
    if method not in method_names():
        return [f"ssl.method={method}", qw]  # let the point's run reject it
    settings = method_settings(method, cfg)
    return [f"ssl.method={method}", qw] + [f"{k}={v}" for k, v in settings.items() if k != "ssl.method"]


def labels_sets(value: str, method: str, cfg: Config) -> list[str]:
    """A labels point: the method's settings at ``data.max_labeled`` = value."""
    return method_sets(method, cfg) + [f"data.max_labeled={value}"]


def _default_method(cfg: Config, method_given: bool) -> list[str]:
    if method_given:
        return []
    return [f"{k}={v}" for k, v in method_settings("qar", cfg).items()]


# ---------------------------------------------------------------------------------------------
# the ablate directory
# ---------------------------------------------------------------------------------------------
_PATH_KEYS = ("data.labeled", "data.unlabeled", "data.cache_dir", "quality.weights_file", "model.weights_file",
              "ssl.quality", "weak.run", "corrupt.run")


def absolute_config(cfg: Config) -> Config:
    """Paths made absolute, so the points (and printed commands) work from any folder."""
    repl: dict[str, Any] = {}
    for key in _PATH_KEYS:
        sec, k = key.split(".")
        v = getattr(getattr(cfg, sec), k)
        if v:
            repl[key] = str(Path(v).expanduser().resolve())
    repl["runs_root"] = str(Path(cfg.runs_root).expanduser().resolve())
    return cfg.replace(**repl)


def _comparable(toml_text: str) -> str:
    """The config text without what may differ between runs of one sweep: the device (machines
    that run and gather the points differ), the base seed (each point has its own --seed) and
    [ablate] (seeds / jobs are not part of a point)."""
    keep, section = [], ""
    for line in toml_text.splitlines():
        if line.startswith("["):
            section = line.strip()
        if section == "[ablate]" or line.startswith(("device =", "seed =")):
            continue
        keep.append(line)
    return "\n".join(keep)


def open_ablate_dir(path: Path, sweep: Sweep, cfg: Config, config_file: str) -> Run:
    """Create the ablate directory, or reopen it when it was made with the same configuration."""
    from qgseg.runs import create_run

    text = dumps_toml(cfg)
    cfg_path = path / "config.toml"
    if path.is_dir() and (path / "meta.json").is_file():
        run = Run(path)
        if run.stage != STAGE or run.meta.get("sweep") != sweep.name:
            raise InputError(f"--out {path}: holds a {run.meta.get('sweep') or run.stage} run, not ablate "
                             f"{sweep.name}; choose another folder")
        if cfg_path.is_file() and _comparable(cfg_path.read_text(encoding="utf-8")) != _comparable(text):
            raise InputError(f"--out {path}: its points were made with another configuration ({cfg_path}); "
                             "use the same options, or another --out for the new configuration")
        from qgseg.runs import process_alive

        if run.status == "running" and run.meta.get("pid") != os.getpid() and process_alive(run):
            raise InputError(f"--out {path}: another ablate process (pid {run.meta.get('pid')}) is working on it; "
                             "wait for it to finish")
        run.update_meta(pid=os.getpid(), pid_start=0)
        run.set_status("running")
        return run
    run = create_run(path, STAGE, text, extra={"sweep": sweep.name, "config_file": config_file})
    for sub in (run.checkpoints, run.plots):  # an ablate run has neither
        if sub.is_dir() and not any(sub.iterdir()):
            sub.rmdir()
    return run


# ---------------------------------------------------------------------------------------------
# prerequisites: one g for phase 2 sweeps, one train-weak run for phase 1 sweeps
# ---------------------------------------------------------------------------------------------
def _usable(run_dir: str, stage: str, image_size: int) -> bool:
    p = Path(run_dir)
    if not (p / "meta.json").is_file():
        return False
    r = Run(p)
    try:
        return r.stage == stage and r.status == "completed" and load_run_config(p).data.image_size == image_size
    except (InputError, OSError):
        return False


def _newest(cfg: Config, stage: str, labeled: str = "") -> str:
    for r in reversed(find_runs(cfg.runs_root, stage)):
        try:
            rc = load_run_config(r.path)
        except (InputError, OSError):
            continue
        if rc.data.image_size != cfg.data.image_size:
            continue
        if labeled and Path(rc.data.labeled).resolve() != Path(labeled).resolve():
            continue
        return str(r.path.resolve())
    return ""


def child_env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_WAIT_POLICY": "PASSIVE"})  # the children's qgseg sets NO_ALBUMENTATIONS_UPDATE
    if threads:
        env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    return env


def stage_command(stage: str, config_file: Path, out: Path, sets: list[str], seed: int | None,
                  extra: list[str] = (), resume: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "qgseg", stage, "--config", str(config_file), "--out", str(out), "--json"]
    if seed is not None:
        cmd += ["--seed", str(seed)]
    for s in sets:
        cmd += ["--set", s]
    cmd += list(extra)
    if resume:
        cmd.append("--resume")
    return cmd


_CHILDREN: set[subprocess.Popen] = set()
_CHILDREN_LOCK = threading.Lock()


def _run_child(cmd: list[str], log_path: Path, env: dict[str, str]) -> tuple[int, str]:
    """Run one stage process; its stderr goes to ``log_path``. Returns (exit code, last stderr line)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as errf, open(os.devnull, "wb") as outf:
        errf.write(("$ " + shlex.join(cmd) + "\n").encode())
        errf.flush()
        proc = subprocess.Popen(cmd, stdout=outf, stderr=errf, env=env, stdin=subprocess.DEVNULL)
        with _CHILDREN_LOCK:
            _CHILDREN.add(proc)
        try:
            rc = proc.wait()
        except KeyboardInterrupt:  # a prerequisite run in the main thread
            _stop([proc])
            raise
        finally:
            with _CHILDREN_LOCK:
                _CHILDREN.discard(proc)
    last = ""
    try:
        lines = [ln for ln in log_path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
        errs = [ln for ln in lines if ln.startswith("qgseg: error") or "Error" in ln]
        last = (errs or lines or [""])[-1].strip()
    except OSError:
        pass
    return rc, last


def stop_children(grace: float = 3.0, wait: float = 120.0) -> None:
    """On Ctrl-C / SIGTERM: let the running points write a resumable checkpoint and stop.

    A terminal's Ctrl-C reaches the children too; a child still running after ``grace`` seconds
    (e.g. the ablate process alone got SIGTERM) is sent SIGTERM, which a stage treats like
    Ctrl-C. Children that do not stop within ``wait`` seconds are killed.
    """
    with _CHILDREN_LOCK:
        procs = list(_CHILDREN)
    _stop(procs, grace, wait)


def _stop(procs: list[subprocess.Popen], grace: float = 3.0, wait: float = 120.0) -> None:
    _wait_then(procs, grace, subprocess.Popen.terminate)
    _wait_then(procs, wait, subprocess.Popen.kill)


def _wait_then(procs: list[subprocess.Popen], seconds: float, escalate) -> None:
    """Wait up to ``seconds`` in all for the processes to end; ``escalate`` each one still running."""
    deadline = time.time() + seconds
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            escalate(proc)


def _prereq(adir: Run, stage: str, config_file: Path, sets: list[str], env: dict[str, str],
            reporter: Reporter) -> str:
    """Train (or resume) ``<ablate>/prereq/<stage>`` in a child process; its path."""
    path = adir.path / "prereq" / stage
    if (path / "meta.json").is_file() and Run(path).status == "completed":
        return str(path.resolve())
    resume = (path / "meta.json").is_file()
    reporter.note(f"ablate: training the shared {stage} run {path} first")
    cmd = stage_command(stage, config_file, path, sets, None, resume=resume)
    rc, last = _run_child(cmd, adir.path / "logs" / f"prereq-{stage}.log", env)
    if rc != 0:
        raise QgsegError(f"ablate: the shared {stage} run {path} failed (exit {rc}): {last}; see "
                         f"{adir.path / 'logs' / f'prereq-{stage}.log'}")
    return str(path.resolve())


def needs_g(sets: list[str], cfg: Config) -> bool:
    """Whether a point's run needs g: --qw, or a QAR weight > 0 (an unreadable one: assume so)."""
    given = dict(item.split("=", 1) for item in sets if "=" in item)
    if given.get("ssl.qw", str(cfg.ssl.qw).lower()) == "true":
        return True
    try:
        return float(given.get("ssl.qar_weight", cfg.ssl.qar_weight)) > 0
    except ValueError:
        return True


def resolve_quality(adir: Run, cfg: Config, quality: str | None, config_file: Path, env: dict[str, str],
                    reporter: Reporter, train: bool = True) -> str:
    """The g every ssl point gets with --quality ("" when none is found and ``train`` is off)."""
    if quality:
        run = resolve_link(quality, cfg.runs_root, "train-quality", "--quality")
        if not _usable(str(run.path), "train-quality", cfg.data.image_size):
            raise InputError(f"--quality {quality}: g was not trained at {cfg.data.image_size} px")
        return str(run.path.resolve())
    used = adir.meta.get("quality_run", "")
    if used and _usable(used, "train-quality", cfg.data.image_size):
        return used
    found = _newest(cfg, "train-quality")
    if found or not train:
        return found
    return _prereq(adir, "train-quality", config_file, [], env, reporter)


def resolve_weak(adir: Run, cfg: Config, config_file: Path, env: dict[str, str], reporter: Reporter) -> str:
    """The train-weak run every train-quality point gets (weak.run)."""
    if cfg.weak.run:
        run = resolve_link(cfg.weak.run, cfg.runs_root, "train-weak", "--weak")
        return str(run.path.resolve())
    used = adir.meta.get("weak_run", "")
    if used and _usable(used, "train-weak", cfg.data.image_size):
        return used
    found = _newest(cfg, "train-weak", cfg.data.labeled)
    if found:
        return found
    return _prereq(adir, "train-weak", config_file, [], env, reporter)


# ---------------------------------------------------------------------------------------------
# points
# ---------------------------------------------------------------------------------------------
def _dir_touched(path: Path) -> float:
    newest = 0.0
    for p in [path, *path.rglob("*")]:
        try:
            newest = max(newest, p.stat().st_mtime)
        except OSError:
            pass
    return newest


def point_state(p: Point) -> str:
    """completed | running (its process is alive) | resumable | fresh.

    A point left ``running`` by a killed process is resumable. Whether the process lives is
    exact for a point started on this host; for one started on another host (a cluster job) a
    point whose folder changed within the last LIVE_SECONDS is taken to be still running.
    """
    from qgseg.runs import process_alive

    meta = p.path / "meta.json"
    if not meta.is_file():
        return "fresh"
    run = Run(p.path)
    st = run.status
    if st == "completed" and (p.path / "summary.json").is_file():
        return "completed"
    if st == "running":
        alive = process_alive(run)
        if alive or (alive is None and time.time() - _dir_touched(p.path) < LIVE_SECONDS):
            return "running"
    return "resumable"


def gather(p: Point, sweep: Sweep) -> None:
    """Read a completed point's summary (and e_val96 from its metrics.csv)."""
    p.summary = read_json(p.path / "summary.json")
    p.status = "completed"
    if sweep.e_val96:
        from qgseg.engine import read_metrics

        vals = []
        for row in read_metrics(p.path):
            try:
                vals.append(float(row.get("val_dsc", "nan")))
            except ValueError:
                vals.append(math.nan)
        p.extra["e_val96"] = float(e_val(vals, 0.96)) if vals else math.nan


def print_line(p: Point, cmd: list[str], cwd: str) -> str:
    """One self-contained shell line: skip when completed, --resume when the point is unfinished."""
    base = shlex.join(cmd)
    meta = shlex.quote(str(p.path / "meta.json"))
    env = "env NO_ALBUMENTATIONS_UPDATE=1 OMP_WAIT_POLICY=PASSIVE"
    return (f"cd {shlex.quote(cwd)} && {{ grep -qs '\"status\": \"completed\"' {meta} || "
            f"{env} {base} $([ -f {meta} ] && echo --resume); }}")


@dataclass
class AblateResult:
    run: Run
    sweep: Sweep
    points: list[Point]
    rows: list[dict[str, Any]]
    commands: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[Point]:
        return [p for p in self.points if p.status != "completed"]


def run_ablate(loaded: Loaded, name: str, values: str | None = None, seeds: int | None = None,
               jobs: int | None = None, out: Path | str | None = None, quality: str | None = None,
               print_commands: bool = False, reporter: Reporter | None = None, resume: bool = False,
               methods: str | None = None) -> AblateResult:
    """Run (or gather) every point of an ablation and write table.csv / table.md / summary.json.

    Running the same command again continues an ablation; ``resume`` says so explicitly and
    refuses when there is nothing to continue."""
    sweep = get_sweep(name)
    grid = parse_values(values, sweep)
    method_grid = parse_methods(methods, sweep)
    cfg = absolute_config(loaded.config)
    n_seeds = seeds if seeds is not None else cfg.ablate.seeds
    n_jobs = jobs if jobs is not None else cfg.ablate.jobs
    if n_seeds < 1:
        raise InputError(f"--seeds {n_seeds}: expected at least 1")
    if n_jobs < 1:
        raise InputError(f"--jobs {n_jobs}: expected at least 1")
    if sweep.stage == "ssl" and not cfg.data.unlabeled and not cfg.data.unused_as_unlabeled and sweep.name != "method":
        log.info("no unlabeled folder (data.unlabeled): ssl points that need one will fail")
    path = (Path(out) if out else Path(cfg.runs_root) / STAGE / sweep.name).resolve()
    if resume and not (path / "meta.json").is_file():
        raise InputError(f"--resume: no {sweep.name} ablation at {path} to continue; leave out --resume to start one")
    adir = open_ablate_dir(path, sweep, cfg, loaded.config_file)
    rep = reporter or Reporter(enabled=False)
    config_file = (adir.path / "config.toml").resolve()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    env = child_env(max(1, cores // n_jobs))
    try:
        result = _run(adir, sweep, grid, cfg, loaded.explicit, n_seeds, n_jobs, quality, config_file, env,
                      print_commands, rep, method_grid)
    except BaseException as e:
        adir.set_status("interrupted" if isinstance(e, KeyboardInterrupt) else "failed",
                        f"{type(e).__name__}: {e}")
        raise
    return result


def _prerequisites(adir: Run, sweep: Sweep, cfg: Config, points: list[Point], quality: str | None,
                   config_file: Path, env: dict[str, str], rep: Reporter) -> list[str]:
    """The run the points need (g for ssl points, a weak run for D_Q's Type 2 masks), recorded in
    the ablate directory's meta; returns the extra command-line items of every point."""
    extra: list[str] = []
    meta_links: dict[str, str] = {}
    with rep:
        if sweep.stage == "ssl":
            # a g is trained only when a point needs one (QW, QAR); else one found gives the quality columns
            need = any(needs_g(p.sets, cfg) for p in points)
            g = resolve_quality(adir, cfg, quality, config_file, env, rep, train=need)
            if g:
                extra, meta_links["quality_run"] = ["--quality", g], g
        elif cfg.corrupt.p_weak > 0 or sweep.name == "p-weak":
            w = resolve_weak(adir, cfg, config_file, env, rep)
            for p in points:
                p.sets = [f"weak.run={w}"] + p.sets
            meta_links["weak_run"] = w
    if meta_links:
        adir.update_meta(**meta_links)
    return extra


def _run_parallel(todo: list[Point], work: Callable[[Point], Point], n_jobs: int, sweep: Sweep,
                  rep: Reporter) -> None:
    """``work`` on every point, ``n_jobs`` at a time; Ctrl-C stops the children resumably."""
    with rep:
        rep.start(f"ablate {sweep.name} points", len(todo))
        with cf.ThreadPoolExecutor(max_workers=n_jobs) as pool:
            futures = {pool.submit(work, p): p for p in todo}
            try:
                for fut in cf.as_completed(futures):
                    p = fut.result()
                    ok = "done" if p.status == "completed" else f"FAILED ({p.reason})"
                    rep.advance(1, info=f"{p.label}: {p.status}")
                    rep.note(f"ablate {sweep.name}: {p.label} {ok}")
            except KeyboardInterrupt:
                for f in futures:
                    f.cancel()
                stop_children()
                raise


def _run(adir: Run, sweep: Sweep, grid: list[str], cfg: Config, explicit: dict[str, str], n_seeds: int,
         n_jobs: int, quality: str | None, config_file: Path, env: dict[str, str], print_commands: bool,
         rep: Reporter, method_grid: list[str] = ("",)) -> AblateResult:
    """Run (or print) the unfinished points of a sweep, gather the finished ones, write the table."""
    count_cache: list[int] = []

    def unlabeled_count() -> int:
        if not count_cache:
            count_cache.append(_unlabeled_count(cfg))
        return count_cache[0]

    def make(v: str, m: str, seed: int) -> Point:
        if not m:
            return Point(v, seed, adir.path / "points" / slug(v) / f"seed{seed}",
                         point_sets(sweep, v, cfg, explicit, unlabeled_count))
        return Point(v, seed, adir.path / "points" / slug(v) / slug(m) / f"seed{seed}", labels_sets(v, m, cfg),
                     method=m)

    points = [make(v, m, cfg.seed + i) for v in grid for m in method_grid for i in range(n_seeds)]
    states = {id(p): point_state(p) for p in points}
    # seed-major: every value of seed 0 before any of seed 1, so a sweep stopped part-way (Ctrl-C,
    # a time limit) leaves complete seed-paired comparisons; the table stays value-major
    todo = sorted((p for p in points if states[id(p)] in ("fresh", "resumable")), key=lambda p: p.seed)
    extra = _prerequisites(adir, sweep, cfg, points, quality, config_file, env, rep) if todo else []
    adir.update_meta(values=grid, seeds=n_seeds, **({"methods": method_grid} if sweep.methods else {}))
    cwd = os.getcwd()
    commands: list[str] = []
    for p in points:
        st = states[id(p)]
        if st == "completed":
            gather(p, sweep)
        elif st == "running":
            p.status, p.reason = "running", "still running in another process; rerun later to gather it"
    if print_commands:
        for p in todo:
            commands.append(print_line(p, stage_command(sweep.stage, config_file, p.path, p.sets, p.seed, extra), cwd))
        rows = table_rows(sweep, grid, points)
        adir.set_status("running", f"{len(todo)} point commands printed")
        return AblateResult(adir, sweep, points, rows, commands)

    def work(p: Point) -> Point:
        resume = point_state(p) == "resumable"
        cmd = stage_command(sweep.stage, config_file, p.path, p.sets, p.seed, extra, resume=resume)
        rc, last = _run_child(cmd, adir.path / "logs" / p.log_name, env)
        if rc == 0 and point_state(p) == "completed":
            gather(p, sweep)
        else:
            p.status = "failed"
            p.reason = f"exit {rc}: {last}" if rc else "the run did not complete"
        return p

    if todo:
        _run_parallel(todo, work, n_jobs, sweep, rep)
    rows = table_rows(sweep, grid, points)
    write_table(adir, sweep, rows)
    bad = [p for p in points if p.status != "completed"]
    summary = {"run": str(adir.path), "stage": STAGE, "sweep": sweep.name, "key": sweep.key, "values": grid,
               **({"methods": list(method_grid)} if sweep.methods else {}),
               "seeds": n_seeds, "points": len(points), "failed": len(bad), "rows": rows,
               "quality_run": adir.meta.get("quality_run", ""), "weak_run": adir.meta.get("weak_run", ""),
               "failures": [{"value": p.value, **({"method": p.method} if p.method else {}), "seed": p.seed,
                             "status": p.status, "reason": p.reason, "point": str(p.path)} for p in bad]}
    adir.write_summary(summary)
    if bad:
        adir.set_status("failed", f"{len(bad)} of {len(points)} points did not complete")
    else:
        adir.set_status("completed")
    return AblateResult(adir, sweep, points, rows)


# ---------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------
def table_rows(sweep: Sweep, grid: list[str], points: list[Point]) -> list[dict[str, Any]]:
    """One row per grid value (labels: per value and method): mean and standard error over the
    completed seeds of each metric, and for a paired sweep the mean +- s.e. over seeds of the
    DSC difference to the row it is compared with (:func:`baseline_of`) at the same seed."""
    rows = []
    keys = list(dict.fromkeys((p.value, p.method) for p in points)) or [(v, "") for v in grid]
    keys.sort(key=lambda k: grid.index(k[0]) if k[0] in grid else len(grid))
    for v, m in keys:
        pts = [p for p in points if p.value == v and p.method == m]
        done = [p for p in pts if p.status == "completed"]
        row: dict[str, Any] = {"value": v}
        if sweep.methods:
            row["method"] = m
        row.update({"seeds": len(done), "of": len(pts)})
        if sweep.name == "unlabeled-size":
            row["M"] = _m_of(pts)
        for key, col in sweep.metrics:
            m_, se = mean_se([_num(p.summary.get(key)) for p in done])
            row[f"{col}_mean"], row[f"{col}_se"] = m_, se
        if sweep.e_val96:
            m_, se = mean_se([p.extra.get("e_val96", math.nan) for p in done])
            row["e_val96_mean"], row["e_val96_se"] = m_, se
        if sweep.paired:
            row.update(_paired(sweep, v, m, done, points, grid))
        if sweep.paired == "zero" and is_zero(v) and pts:  # what the 0 point ran, e.g. "0 (sup)"
            ran = next((x.split("=", 1)[1] for x in pts[0].sets if x.startswith("ssl.method=")), "")
            row["label"] = f"{v} ({ran})" if ran else v
        states = [p.status for p in pts]
        row["status"] = ("ok" if all(s == "completed" for s in states) else
                         ", ".join(f"{states.count(s)} {s}" for s in ("failed", "running", "pending") if s in states))
        row["failures"] = "; ".join(f"seed {p.seed}: {p.reason}" for p in pts if p.status != "completed")
        rows.append(row)
    return rows


def baseline_of(sweep: Sweep, value: str, method: str, grid: list[str]) -> tuple[str, str] | None:
    """The (value, method) row a row is compared with: sup at the same value (labels), the sup row
    (method), the 0 value (lambda sweeps); None for the baseline itself or when it is not in the grid."""
    if sweep.paired == "sup" and sweep.methods:
        return None if method == "sup" else (value, "sup")
    if sweep.paired == "sup":
        return None if value == "sup" or "sup" not in grid else ("sup", "")
    if sweep.paired == "zero":
        zero = next((v for v in grid if is_zero(v)), None)
        return None if zero is None or value == zero else (zero, "")
    return None


def _paired(sweep: Sweep, value: str, method: str, done: list[Point], points: list[Point],
            grid: list[str]) -> dict[str, Any]:
    """dDSC_mean / dDSC_se / pairs: DSC minus the baseline row's DSC, paired by seed."""
    key = baseline_of(sweep, value, method, grid)
    diffs = []
    if key is not None:
        base = {p.seed: p for p in points if (p.value, p.method) == key and p.status == "completed"}
        diffs = [_num(p.summary.get("test_dsc")) - _num(base[p.seed].summary.get("test_dsc"))
                 for p in done if p.seed in base]
    m, se = mean_se(diffs)
    return {"dDSC_mean": m, "dDSC_se": se, "pairs": len(diffs)}


def _m_of(points: list[Point]) -> Any:
    for p in points:
        if p.status == "completed" and p.summary.get("n_unlabeled") is not None:
            return p.summary["n_unlabeled"]
    for s in points[0].sets if points else []:
        if s.startswith("data.max_unlabeled="):
            return s.split("=", 1)[1]
    return ""


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def metric_columns(sweep: Sweep) -> list[str]:
    cols = [c for _, c in sweep.metrics]
    return cols + (["e_val96"] if sweep.e_val96 else [])


def _pm(m: float, se: float, digits: int = 4) -> str:
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return "-"
    return f"{m:.{digits}f} ± {se:.{digits}f}"


def _digits(col: str) -> int:
    return 1 if col == "e_val96" else 4


def paired_header(sweep: Sweep) -> str:
    return "Δ DSC vs " + ("sup" if sweep.paired == "sup" else "0") + " (paired)"


def _delta(r: dict[str, Any]) -> str:
    if not r.get("pairs"):
        return "-"
    return f"{r['dDSC_mean']:+.4f} ± {r['dDSC_se']:.4f} ({r['pairs']})"


def display_rows(sweep: Sweep, rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    head = ([sweep.name] + (["method"] if sweep.methods else []) + (["M"] if sweep.name == "unlabeled-size" else [])
            + ["seeds"])
    head += metric_columns(sweep) + ([paired_header(sweep)] if sweep.paired else []) + ["status"]
    body = []
    for r in rows:
        line = [str(r.get("label", r["value"]))] + ([r["method"]] if sweep.methods else [])
        line += [str(r["M"])] if sweep.name == "unlabeled-size" else []
        line.append(f"{r['seeds']}/{r['of']}")
        line += [_pm(r[f"{c}_mean"], r[f"{c}_se"], _digits(c)) for c in metric_columns(sweep)]
        line += [_delta(r)] if sweep.paired else []
        line.append(r["status"])
        body.append(line)
    return head, body


def write_table(adir: Run, sweep: Sweep, rows: list[dict[str, Any]]) -> None:
    """table.csv (numbers) and table.md (mean ± s.e.) in the ablate directory."""
    cols = (["value"] + (["method"] if sweep.methods else []) + (["M"] if sweep.name == "unlabeled-size" else [])
            + ["seeds", "of"])
    for c in metric_columns(sweep):
        cols += [f"{c}_mean", f"{c}_se"]
    cols += ["dDSC_mean", "dDSC_se", "pairs"] if sweep.paired else []
    cols += ["status", "failures"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow([("" if isinstance(r[c], float) and math.isnan(r[c]) else r[c]) for c in cols])
    atomic_write_text(adir.path / "table.csv", buf.getvalue())
    head, body = display_rows(sweep, rows)
    base = ("sup's at the same value" if sweep.methods else "the sup row's" if sweep.paired == "sup"
            else "the 0 row's")
    paired = (f" {paired_header(sweep)}: the mean ± s.e. over seeds of each seed's DSC minus {base} at that "
              "seed (number of pairs)." if sweep.paired else "")
    md = [f"# ablate {sweep.name}", "", f"{sweep.help}; mean ± standard error over seeds.{paired}", "",
          "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    md += ["| " + " | ".join(x.replace("|", "\\|") for x in line) + " |" for line in body]
    atomic_write_text(adir.path / "table.md", "\n".join(md) + "\n")


def render(result: AblateResult) -> Any:
    """A Rich table of the sweep (stdout)."""
    from rich.table import Table

    head, body = display_rows(result.sweep, result.rows)
    t = Table(title=f"ablate {result.sweep.name}: mean ± standard error over seeds", header_style="bold",
              caption=str(result.run.path))
    for i, h in enumerate(head):
        t.add_column(h, justify="left" if i == 0 or h == "status" else "right")
    for line in body:
        style = None if line[-1] == "ok" else "red"
        t.add_row(*line, style=style)
    return t
