"""Run directories: creation, meta.json status, atomic writes, and lookup of the newest run.

Layout (see docs/architecture.md): ``config.toml meta.json splits.json metrics.csv summary.json log.txt
checkpoints/ plots/``. A run is only ``completed`` when its stage finished and wrote summary.json.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import json
import math
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


def json_ready(obj: Any) -> Any:
    """A summary (nested dicts / lists) with its NaN / infinite floats as None, so it is strict JSON
    (e.g. a metric undefined on no cases); :func:`json_safe` also says where."""
    return json_safe(obj)[0]


def _is_main_process() -> bool:
    """Rank 0 under torchrun, or a single process (as distributed.is_main_process, without torch)."""
    return int(os.environ.get("RANK", "0")) == 0


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path`` and rename it into place.

    Under torchrun only rank 0 writes (the run directory and the data cache are shared).
    """
    if not _is_main_process():
        return
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
    """Strict JSON (RFC 8259): a NaN or infinity is written as null, never as a bare ``NaN``."""
    clean, _ = json_safe(obj)
    atomic_write_text(path, json.dumps(clean, indent=2, default=_json_default, allow_nan=False) + "\n")


def json_safe(obj: Any, _prefix: str = "") -> tuple[Any, list[str]]:
    """``obj`` with every non-finite float (NaN, +-inf, numpy / torch scalars too) replaced by None,
    and the dotted keys where that happened."""
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy / torch scalars
        obj = obj.item()
    if isinstance(obj, float):
        return (obj, []) if math.isfinite(obj) else (None, [_prefix or "value"])
    if isinstance(obj, dict):
        out, bad = {}, []
        for k, v in obj.items():
            out[k], b = json_safe(v, f"{_prefix}.{k}" if _prefix else str(k))
            bad += b
        return out, bad
    if isinstance(obj, (list, tuple)):
        out_l, bad = [], []
        for i, v in enumerate(obj):
            c, b = json_safe(v, f"{_prefix}[{i}]")
            out_l.append(c)
            bad += b
        return out_l, bad
    return obj, []


def finish_summary(summary: dict[str, Any], key_metrics: Iterable[str] = (),
                   reasons: dict[str, str] | None = None) -> dict[str, Any]:
    """A summary that is defined: non-finite values become null, each listed with a reason under
    ``undefined``; key metrics that are null also go to ``key_metrics_undefined`` with a warning
    under ``warnings`` (the CLI prints them and exits 3, see docs/reliability.md)."""
    reasons = reasons or {}
    clean, bad = json_safe(summary)
    undefined = dict(clean.get("undefined") or {})
    for key in bad:
        undefined.setdefault(key, reasons.get(key, "not a finite number (NaN or infinite)"))
    missing = [k for k in key_metrics if clean.get(k) is None]
    for key in missing:
        undefined.setdefault(key, reasons.get(key, "not computed"))
    if undefined:
        clean["undefined"] = undefined
    if missing:
        clean["key_metrics_undefined"] = missing
        clean["warnings"] = list(clean.get("warnings") or []) + [
            f"key metric {k} is undefined: {undefined[k]}" for k in missing]
    return clean


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
        self.previous_status = ""  # the status a resumed run had before this process took it

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
        """meta.json, or {} when it is missing or unreadable (for lookups; see :meth:`read_meta`)."""
        try:
            meta = read_json(self.meta_path)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return {}
        return meta if isinstance(meta, dict) else {}

    def read_meta(self) -> dict[str, Any]:
        """meta.json, strictly: a damaged file is an InputError naming it ({} when it is absent)."""
        if not self.meta_path.exists():
            return {}
        try:
            meta = read_json(self.meta_path)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{self.meta_path}: unreadable run record ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200] if str(e) else ''}); restore it or start a new run") from None
        if not isinstance(meta, dict):
            raise InputError(f"{self.meta_path}: expected a JSON object, found {type(meta).__name__}")
        return meta

    def update_meta(self, **fields: Any) -> dict[str, Any]:
        """Merge ``fields`` into meta.json. A damaged meta.json is refused, never overwritten with
        only the new fields (which would lose the stage, status history and provenance)."""
        meta = self.read_meta()
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
        if not _is_main_process():
            return
        with open(self.path / "log.txt", "a", encoding="utf-8") as f:
            f.write(f"{_now()} {message}\n")

    def write_summary(self, summary: dict[str, Any], key_metrics: Iterable[str] = (),
                      reasons: dict[str, str] | None = None) -> dict[str, Any]:
        """Write summary.json through :func:`finish_summary`; returns what was written."""
        summary = finish_summary(summary, key_metrics, reasons)
        write_json(self.path / "summary.json", summary)
        for w in summary.get("warnings", []):
            self.log(f"warning: {w}")
        return summary

    @property
    def summary(self) -> dict[str, Any]:
        return read_json(self.path / "summary.json")

    @contextlib.contextmanager
    def guard(self) -> Iterator["Run"]:
        """Mark the run ``interrupted`` on Ctrl-C / SIGTERM and ``failed`` (with the reason) on errors.

        An exit with code 0 (``SystemExit(0)``, ``typer.Exit(0)``) leaves the status alone, and
        exit 130 counts as an interruption. The guard never marks a run ``completed``: only the
        stage does, after it wrote summary.json.
        """
        try:
            yield self
        except KeyboardInterrupt:
            self._finish("interrupted", "interrupted by the user (Ctrl-C or SIGTERM)")
            raise
        except BaseException as e:
            code = _exit_code(e)
            if getattr(e, "keep_status", False) and self.previous_status:
                # refused before anything changed (e.g. a damaged last.pt on resume): the run stays as it was
                self._finish(self.previous_status, " ".join(f"resume refused: {e}".split()))
            elif code == 130:
                self._finish("interrupted", "interrupted (exit 130)")
            elif code != 0:
                reason = f"exit {code}" if code is not None else f"{type(e).__name__}: {e}"
                self._finish("failed", " ".join(reason.split()))  # one line, as the CLI prints it
            raise
        finally:
            release_lock(self.path)  # the stage is over; the kernel would drop it at exit anyway

    def _finish(self, status: str, reason: str) -> None:
        # best effort: a damaged meta.json or a full disk must not hide the error being handled
        try:
            self.set_status(status, reason)
            self.log(f"{status}: {reason}")
        except Exception as e:  # noqa: BLE001
            import logging

            logging.getLogger("qgseg").warning("%s: could not mark the run %s (%s)", self.path, status, e)

    def __repr__(self) -> str:  # pragma: no cover
        return f"Run({str(self.path)!r})"


def _exit_code(e: BaseException) -> int | None:
    """The exit code of SystemExit or typer's / click's Exit, None for any other exception."""
    if isinstance(e, SystemExit):
        return 0 if e.code is None else (e.code if isinstance(e.code, int) else 1)
    # typer.Exit is its own class in newer typer (not click's); both carry exit_code
    if type(e).__name__ == "Exit" and type(e).__module__.split(".")[0] in ("typer", "click"):
        return int(getattr(e, "exit_code", 1))
    return None


def _proc_stat(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat after "(comm)" (Linux): [state, ppid, ...]; [] where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2:].split()
    except (OSError, ValueError):
        return []


def _process_start(pid: int) -> int:
    """Start time of a process in clock ticks since boot (Linux), 0 where unknown."""
    fields = _proc_stat(pid)
    return int(fields[19]) if len(fields) > 19 else 0  # field 22 of stat


def _process_alive(pid: int, host: str, started: int = 0) -> bool:
    """Whether ``pid`` on this host is a live process other than this one.

    Only checked on the same host. Where the process start time was recorded (Linux), it must
    match, so a recycled pid of an unrelated process does not count; a zombie is dead.
    """
    if not pid or host != socket.gethostname() or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass  # exists, owned by someone else
    fields = _proc_stat(pid)
    if not fields:
        return not started  # no /proc: trust the pid
    if fields[0] in ("Z", "X"):
        return False
    return not started or int(fields[19]) == started


def process_alive(run: "Run") -> bool | None:
    """Whether the process that last started or resumed ``run`` is still alive.

    True / False when the run was started on this host (exact on Linux, where the process start
    time is recorded, so a recycled pid does not count); None when it cannot be told (another
    host, or a run made before pids were recorded). A run killed outright (SIGKILL, power loss)
    still says ``running`` in meta.json: this tells it from one in progress.
    """
    meta = run.meta
    pid, host = int(meta.get("pid") or 0), str(meta.get("host", ""))
    if not pid or host != socket.gethostname():
        return None
    if pid == os.getpid():
        return True
    return _process_alive(pid, host, int(meta.get("pid_start") or 0))


def _still_running(run: "Run") -> int:
    """The pid of the live process writing ``run`` (status running, another process), else 0."""
    meta = run.meta
    if meta.get("status") != "running":
        return 0
    pid = int(meta.get("pid") or 0)
    return pid if _process_alive(pid, str(meta.get("host", "")), int(meta.get("pid_start") or 0)) else 0


def _remove_stale_temp_files(run: "Run") -> None:
    """Temporary files of atomic writes cut short by a kill (never read; safe to drop)."""
    for folder in (run.path, run.checkpoints, run.path / "predictions"):
        if folder.is_dir():
            for p in folder.glob(".*.tmp"):
                try:
                    p.unlink()
                except OSError:
                    pass


# ---------------------------------------------------------------------------------------------
# the run lock: one process trains a run
# ---------------------------------------------------------------------------------------------
LOCK_NAME = ".lock"
_held: dict[str, int] = {}  # resolved run path -> fd of the lock this process holds


def _lock_key(path: Path) -> str:
    return str(Path(path).resolve())


def lock_holder(path: Path | str) -> str:
    """Who holds the lock of run ``path`` ("process N on HOST"), read from the lock file."""
    try:
        text = (Path(path) / LOCK_NAME).read_text(encoding="utf-8").split()
    except OSError:
        text = []
    if len(text) >= 2:
        return f"process {text[0]} on {text[1]}"
    pid = Run(path).meta.get("pid")
    return f"process {pid}" if pid else "another process"


def acquire_lock(path: Path | str, option: str = "--out") -> None:
    """Take the run's OS file lock (``RUN/.lock``, ``fcntl.flock``) for the life of this process.

    The kernel drops the lock when the process ends, however it ends (SIGKILL, power loss of
    a local disk), so a stale lock cannot exist. A lock this process already holds is kept
    (re-entrant). Another process holding it is an InputError (exit 2) naming that process.
    """
    key = _lock_key(path)
    if key in _held:
        return
    lock_path = Path(path) / LOCK_NAME
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise InputError(f"{option} {path}: cannot create the run lock {lock_path} ({e.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise InputError(f"{option} {path}: run is in use by {lock_holder(path)}; only one process may "
                             "train a run: wait for it to finish or stop it first") from None
        raise InputError(f"{option} {path}: cannot lock the run ({e.strerror})") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
    _held[key] = fd


def release_lock(path: Path | str) -> None:
    """Give up the lock of run ``path`` if this process holds it (a stage that ended)."""
    fd = _held.pop(_lock_key(path), None)
    if fd is not None:
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        os.close(fd)  # closing the only descriptor releases the flock


def is_locked(path: Path | str) -> bool:
    """Whether another process holds the lock of run ``path`` (this process's own lock is not counted)."""
    if _lock_key(path) in _held:
        return False
    lock_path = Path(path) / LOCK_NAME
    if not lock_path.is_file():
        return False
    try:
        fd = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # also drops the probe's own lock
    return False


def new_run_dir(root: Path | str, stage: str, name: str = "") -> Path:
    """Create and return a fresh, empty ``<root>/<stage>/<YYYYmmdd-HHMMSS>[-name]`` (suffixed if taken)."""
    base = Path(root) / stage
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"runs_root {root}: cannot make {base} ({e.strerror or e}); set runs_root or --out to "
                         "a folder you can write to") from None
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
        except OSError as e:
            raise InputError(f"runs_root {root}: cannot make {path} ({e.strerror or e}); set runs_root or --out "
                             "to a folder you can write to") from None


def create_run(path: Path | str, stage: str, config_toml: str, argv: Iterable[str] | None = None,
               device: str = "", extra: dict[str, Any] | None = None) -> Run:
    """Create (or re-open for a fresh start) a run directory and mark it running."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"--out {path}: is a file, not a folder; choose an empty or new folder")
    if path.exists() and any(p.name != LOCK_NAME for p in path.iterdir()):
        meta_path = path / "meta.json"
        if not meta_path.exists():
            raise InputError(f"--out {path}: folder exists and is not a qgseg run; choose an empty or new folder")
        status = Run(path).status
        if status == "completed":
            raise InputError(f"--out {path}: a completed run is already there; choose another folder")
        raise InputError(f"--out {path}: an unfinished run ({status or 'unknown'}) is there; "
                         "continue it with --resume or choose another folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        (path / "checkpoints").mkdir(exist_ok=True)
        (path / "plots").mkdir(exist_ok=True)
        atomic_write_text(path / "config.toml", config_toml)
    except OSError as e:
        raise InputError(f"--out {path}: cannot write there ({e.strerror or e}); choose a folder you can "
                         "write to") from None
    run = Run(path)
    meta = {
        "stage": stage,
        "status": "running",
        "created": _now(),
        "updated": _now(),
        "argv": list(argv if argv is not None else sys.argv),
        "cwd": os.getcwd(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_start": _process_start(os.getpid()),
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
        meta = run.read_meta()
        if meta.get("stage") != stage:
            raise InputError(f"--out {value}: is a {meta.get('stage') or 'unknown'} run, not {stage}")
        if meta.get("status") == "completed":
            raise InputError(f"--out {value}: run is already completed; nothing to resume")
        pid = _still_running(run)
        if pid:
            raise InputError(f"--out {value}: run is still in progress (process {pid}); stop it first or "
                             "wait for it to finish")
        return run
    # a run killed outright (SIGKILL, power loss) still says "running": it is resumable unless
    # its process is alive
    candidates = [r for r in find_runs(root, stage, status=None)
                  if r.status != "completed" and not _still_running(r) and not is_locked(r.path)]
    if not candidates:
        raise InputError(f"--resume: no unfinished {stage} run under {Path(root) / stage}")
    return candidates[-1]


def _warn_ignored_options(loaded: Any, cfg: Any, run: "Run") -> None:
    """--resume continues with the run's saved configuration: say which given options differ."""
    import logging

    from qgseg.config import to_dict

    given, saved = to_dict(loaded.config), to_dict(cfg)
    ignored = []
    for key, source in getattr(loaded, "explicit", {}).items():
        if source not in ("option", "--set") or key in ("device", "runs_root"):
            continue
        a, b = given, saved
        for part in key.split("."):
            a, b = (a or {}).get(part), (b or {}).get(part)
        if a != b:
            ignored.append(f"{key}={a!r} (run has {b!r})")
    if ignored:
        logging.getLogger("qgseg").warning("--resume %s continues with its saved configuration; ignored: %s",
                                           run.path, ", ".join(ignored))


def start_run(stage: str, loaded: Any, out: Path | str | None, resume: bool = False,
              device: str = "", name: str = "") -> tuple[Run, Any, bool]:
    """Create a new run directory for ``stage`` or reopen one for ``--resume`` (see
    :func:`_start_run_here`). Under torchrun rank 0 does it and the other ranks open the same run."""
    if "qgseg.distributed" not in sys.modules:  # never set up: a single process (and no torch import here)
        return _start_run_here(stage, loaded, out, resume, device, name)
    from qgseg import distributed

    if not distributed.active():
        return _start_run_here(stage, loaded, out, resume, device, name)
    result, error = None, ""
    if distributed.is_main_process():
        try:
            run, cfg, resuming = _start_run_here(stage, loaded, out, resume, device, name)
            result = (str(run.path), resuming)
        except InputError as e:
            error = str(e)
    result, error = distributed.broadcast_object((result, error))
    if error:
        raise InputError(error)
    if distributed.is_main_process():
        return run, cfg, resuming
    from qgseg.config import load_run_config

    path, resuming = result
    return Run(path), load_run_config(Path(path)), resuming


def _start_run_here(stage: str, loaded: Any, out: Path | str | None, resume: bool = False,
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
        # the lock makes the checks above final: a second process resuming the same run stops here
        acquire_lock(run.path, "--out" if out else "--resume")
        try:
            meta = run.read_meta()  # read again under the lock: the run may have moved on meanwhile
            if meta.get("status") == "completed":
                raise InputError(f"--out {run.path}: run is already completed; nothing to resume")
            cfg = load_run_config(run.path)
        except BaseException:
            release_lock(run.path)
            raise
        run.previous_status = str(meta.get("status", ""))
        _warn_ignored_options(loaded, cfg, run)
        _remove_stale_temp_files(run)
        meta = run.read_meta()
        run.update_meta(resumed=int(meta.get("resumed", 0)) + 1, pid=os.getpid(),
                        pid_start=_process_start(os.getpid()), host=socket.gethostname())
        run.set_status("running")
        run.log("resumed")
        return run, cfg, True
    path = Path(out) if out else new_run_dir(cfg.runs_root, stage, name)
    if path.is_dir() and any(p.name != LOCK_NAME for p in path.iterdir()):
        create_run(path, stage, "")  # refuses with the reason (a run or other files are there)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"--out {path}: cannot write there ({e.strerror or e}); choose a folder you can "
                         "write to") from None
    acquire_lock(path)  # two processes given the same new --out: one makes the run, the other stops
    try:
        run = create_run(path, stage, dumps_toml(cfg), device=device,
                         extra={"config_file": getattr(loaded, "config_file", "")})
    except BaseException:
        release_lock(path)
        raise
    run.log(f"created {stage} run")
    return run, cfg, False
