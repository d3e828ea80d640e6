"""Run directories: creation, meta.json status, atomic writes, and lookup of the newest run.

Layout (see DESIGN.md): ``config.toml meta.json splits.json metrics.csv summary.json log.txt
checkpoints/ plots/``. A run is only ``completed`` when its stage finished and wrote summary.json.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from qgseg.errors import InputError

STATUSES = ("running", "completed", "failed", "interrupted")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path`` and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):  # numpy/torch scalars and arrays (.item() fails on arrays)
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _now() -> str:
    # microseconds: runs created within one second must still sort in creation order (latest())
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


def _git_sha() -> str:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _versions() -> dict[str, str]:
    import qgseg

    out = {"python": platform.python_version(), "qgseg": qgseg.__version__}
    for mod in ("torch", "timm", "segmentation_models_pytorch", "numpy"):
        m = sys.modules.get(mod)
        if m is not None and hasattr(m, "__version__"):
            out[mod] = m.__version__
    return out


class Run:
    """A run directory of one stage (``train-quality``, ``ssl``, ...)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    # -- paths -----------------------------------------------------------------------------
    @property
    def meta_path(self) -> Path:
        return self.path / "meta.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # -- meta ------------------------------------------------------------------------------
    @property
    def meta(self) -> dict[str, Any]:
        try:
            return read_json(self.meta_path)
        except (OSError, json.JSONDecodeError):
            return {}

    def update_meta(self, **fields: Any) -> dict[str, Any]:
        meta = self.meta
        meta.update(fields)
        write_json(self.meta_path, meta)
        return meta

    @property
    def status(self) -> str:
        return self.meta.get("status", "")

    @property
    def stage(self) -> str:
        return self.meta.get("stage", "")

    def set_status(self, status: str, reason: str = "") -> None:
        assert status in STATUSES, status
        fields: dict[str, Any] = {"status": status, "updated": _now()}
        if status in ("completed", "failed", "interrupted"):
            fields["finished"] = _now()
        if reason:
            fields["reason"] = reason
        elif status in ("running", "completed"):
            fields["reason"] = ""
        self.update_meta(**fields)

    def log(self, message: str) -> None:
        with open(self.path / "log.txt", "a", encoding="utf-8") as f:
            f.write(f"{_now()} {message}\n")

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json(self.path / "summary.json", summary)

    @property
    def summary(self) -> dict[str, Any]:
        return read_json(self.path / "summary.json")

    @contextlib.contextmanager
    def guard(self) -> Iterator["Run"]:
        """Mark the run ``interrupted`` on Ctrl-C / SIGTERM and ``failed`` (with the reason) on errors."""
        try:
            yield self
        except KeyboardInterrupt:
            self.set_status("interrupted", "interrupted by the user (Ctrl-C or SIGTERM)")
            self.log("interrupted")
            raise
        except BaseException as e:
            reason = f"{type(e).__name__}: {e}" if not isinstance(e, SystemExit) else f"exit {e.code}"
            self.set_status("failed", reason)
            self.log(f"failed: {reason}")
            raise

    def __repr__(self) -> str:  # pragma: no cover
        return f"Run({str(self.path)!r})"


def new_run_dir(root: Path | str, stage: str, name: str = "") -> Path:
    """Create and return a fresh, empty ``<root>/<stage>/<YYYYmmdd-HHMMSS>[-name]`` (suffixed if taken)."""
    base = Path(root) / stage
    base.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    stem = f"{stamp}-{name}" if name else stamp
    path, i = base / stem, 1
    while True:
        try:  # mkdir reserves the name atomically: parallel runs (ablate --jobs) never share one
            path.mkdir()
            return path
        except FileExistsError:
            path = base / f"{stem}-{i}"
            i += 1


def create_run(path: Path | str, stage: str, config_toml: str, argv: Iterable[str] | None = None,
               device: str = "", extra: dict[str, Any] | None = None) -> Run:
    """Create (or re-open for a fresh start) a run directory and mark it running."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"--out {path}: is a file, not a folder; choose an empty or new folder")
    if path.exists() and any(path.iterdir()):
        meta_path = path / "meta.json"
        if not meta_path.exists():
            raise InputError(f"--out {path}: folder exists and is not a qgseg run; choose an empty or new folder")
        status = Run(path).status
        if status == "completed":
            raise InputError(f"--out {path}: a completed run is already there; choose another folder")
        raise InputError(f"--out {path}: an unfinished run ({status or 'unknown'}) is there; "
                         "continue it with --resume or choose another folder")
    path.mkdir(parents=True, exist_ok=True)
    (path / "checkpoints").mkdir(exist_ok=True)
    (path / "plots").mkdir(exist_ok=True)
    atomic_write_text(path / "config.toml", config_toml)
    run = Run(path)
    meta = {
        "stage": stage,
        "status": "running",
        "created": _now(),
        "updated": _now(),
        "argv": list(argv if argv is not None else sys.argv),
        "cwd": os.getcwd(),
        "host": socket.gethostname(),
        "device": device,
        "git_sha": _git_sha(),
        "versions": _versions(),
        "reason": "",
    }
    meta.update(extra or {})
    write_json(run.meta_path, meta)
    return run


def find_runs(root: Path | str, stage: str, status: str | None = "completed") -> list[Run]:
    """Runs of a stage under ``root/stage``, oldest first (by creation time in meta.json)."""
    base = Path(root) / stage
    if not base.is_dir():
        return []
    runs = []
    for p in base.iterdir():
        if not (p / "meta.json").is_file():
            continue
        r = Run(p)
        meta = r.meta
        if status is not None and meta.get("status") != status:
            continue
        runs.append((meta.get("created", ""), p.name, r))
    return [r for *_, r in sorted(runs, key=lambda t: (t[0], t[1]))]


def latest(root: Path | str, stage: str, status: str | None = "completed") -> Run | None:
    """The newest run of a stage with the given status, or None."""
    runs = find_runs(root, stage, status)
    return runs[-1] if runs else None


def resolve_link(value: str, root: Path | str, stage: str, option: str, required: bool = True) -> Run | None:
    """A run given by path (``--quality RUN``), or the newest completed run of ``stage``.

    Raises InputError when a named run is missing or incomplete, or when none exists and it is
    required.
    """
    if value:
        p = Path(value)
        if not (p / "meta.json").is_file():
            raise InputError(f"{option} {value}: not a qgseg run directory (no meta.json)")
        run = Run(p)
        if run.stage and run.stage != stage:
            raise InputError(f"{option} {value}: is a {run.stage} run, expected a {stage} run")
        if run.status != "completed":
            raise InputError(f"{option} {value}: run is {run.status or 'unfinished'}, expected a completed "
                             f"{stage} run")
        return run
    run = latest(root, stage)
    if run is None and required:
        raise InputError(f"{option}: no completed {stage} run under {Path(root) / stage}; run "
                         f"`qgseg {stage}` first or pass {option} RUN")
    return run


def resume_target(value: str, root: Path | str, stage: str) -> Run:
    """The run to continue for ``--resume [--out RUN]``: a named run, else the newest unfinished one."""
    if value and value not in ("latest", "auto"):
        p = Path(value)
        if not (p / "meta.json").is_file():
            raise InputError(f"--out {value}: not a qgseg run directory to resume (no meta.json)")
        run = Run(p)
        if run.stage != stage:
            raise InputError(f"--out {value}: is a {run.stage} run, not {stage}")
        if run.status == "completed":
            raise InputError(f"--out {value}: run is already completed; nothing to resume")
        return run
    candidates = [r for r in find_runs(root, stage, status=None) if r.status != "completed"]
    if not candidates:
        raise InputError(f"--resume: no unfinished {stage} run under {Path(root) / stage}")
    return candidates[-1]


def start_run(stage: str, loaded: Any, out: Path | str | None, resume: bool = False,
              device: str = "", name: str = "") -> tuple[Run, Any, bool]:
    """Create a new run directory for ``stage`` or reopen one for ``--resume``.

    With ``resume``, ``out`` names the run to continue (default: the newest unfinished run of
    the stage). Returns (run, config, resuming). A resumed run continues with the configuration
    saved in its directory; other options given with ``--resume`` are ignored.
    """
    from qgseg.config import dumps_toml, load_run_config

    cfg = loaded.config
    if resume:
        run = resume_target(str(out) if out else "latest", cfg.runs_root, stage)
        cfg = load_run_config(run.path)
        run.update_meta(resumed=run.meta.get("resumed", 0) + 1)
        run.set_status("running")
        run.log("resumed")
        return run, cfg, True
    path = Path(out) if out else new_run_dir(cfg.runs_root, stage, name)
    run = create_run(path, stage, dumps_toml(cfg), device=device,
                     extra={"config_file": getattr(loaded, "config_file", "")})
    run.log(f"created {stage} run")
    return run, cfg, False
