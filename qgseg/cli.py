"""The ``qgseg`` command line: parse options, call the library, render the result.

stdout carries only the result (a Rich table, or one JSON document with ``--json``); logs and
progress go to stderr. Exit codes: 0 success, 1 runtime failure, 2 bad usage / config / data,
3 completed but a key metric is undefined (summary.json lists it under ``undefined`` with the
reason), 130 interrupted (after a resumable checkpoint was written).
"""
from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer
from typer.core import TyperCommand
from typing_extensions import Annotated

from qgseg.errors import QgsegError

log = logging.getLogger("qgseg")
EXIT_UNDEFINED = 3  # the run completed, but a key metric of its summary is undefined (null, with a reason)

app = typer.Typer(
    name="qgseg",
    help="Quality-guided semi-supervised learning for binary 2-D medical image segmentation.\n\n"
    "Phase 1 trains a quality predictor g(image, mask) ~ Dice; phase 2 uses frozen g to guide "
    "semi-supervised training (QAR loss, QW pseudolabel weights).\n\n"
    "Without --preset the defaults are the paper's GPU budget (128 px, UNet++, g 150 epochs, ssl 200 "
    "epochs); on a CPU start with --preset cpu. `qgseg config show` prints the resolved settings.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# ---------------------------------------------------------------------------------------------
# shared options: one alias per option that several commands take
# ---------------------------------------------------------------------------------------------
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="TOML run file (default: ./qgseg.toml if present).", rich_help_panel="Configuration")]
PresetOpt = Annotated[Optional[str], typer.Option("--preset", help="Built-in preset: paper (GPU, paper-faithful), cpu (small, fast) or demo (qgseg demo's minutes-long settings). Without one the built-in defaults are the paper's GPU budget.", rich_help_panel="Configuration")]
SetOpt = Annotated[Optional[List[str]], typer.Option("--set", help="Override any key: --set train.epochs=5 (repeatable).", rich_help_panel="Configuration")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", "-o", help="Run directory (default: runs/<command>/<timestamp>).", rich_help_panel="Output")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Random seed.", rich_help_panel="Configuration")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="auto, cpu, cuda or cuda:N.", rich_help_panel="Configuration")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print exactly one JSON document on stdout.", rich_help_panel="Output")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors on stderr; no progress and no result table (--json still prints its document).", rich_help_panel="Output")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks.", rich_help_panel="Output")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the run given by --out, or the newest unfinished run of this command.", rich_help_panel="Output")]
LabeledOpt = Annotated[Optional[str], typer.Option("--labeled", help="Labeled data folder (images + masks).", rich_help_panel="Data")]
UnlabeledOpt = Annotated[Optional[str], typer.Option("--unlabeled", help="Unlabeled image folder.", rich_help_panel="Data")]
SizeOpt = Annotated[Optional[int], typer.Option("--image-size", help="Side length images are resized to.", rich_help_panel="Data")]
KOpt = Annotated[Optional[int], typer.Option("--k", help="Corrupted masks per training image (K).")]
WeakOpt = Annotated[Optional[str], typer.Option("--weak", help="train-weak run for Type 2 masks (default: newest matching one).")]


def QualityOpt(help: str) -> Any:  # noqa: N802 - used like the option aliases above
    """``--quality RUN`` (a train-quality run); each command says what it uses g for."""
    return Annotated[Optional[str], typer.Option("--quality", help=help)]


# the one option -> config key map: a command's parameter of this name sets that key
OPTION_KEYS: dict[str, str] = {
    "seed": "seed", "device": "device",
    "labeled": "data.labeled", "unlabeled": "data.unlabeled", "image_size": "data.image_size",
    "k": "corrupt.k", "p_weak": "corrupt.p_weak", "corrupt_run": "corrupt.run", "weak": "weak.run",
    "backbone": "quality.backbone", "quality_epochs": "quality.epochs", "weights_file": "quality.weights_file",
    "resample": "quality.resample",
    "method": "ssl.method", "qw": "ssl.qw", "qar_weight": "ssl.qar_weight", "quality": "ssl.quality",
    "arch": "model.arch", "encoder": "model.encoder", "epochs": "train.epochs",
}


def config_options(params: dict[str, Any]) -> dict[str, Any]:
    """``{config key: value}`` of a command's parameters that OPTION_KEYS maps (None = not given)."""
    return {OPTION_KEYS[name]: value for name, value in params.items() if name in OPTION_KEYS}


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value == "":
        return "none"
    return ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def default_help(key: str) -> str:
    """`` [default: 200 (train.epochs); cpu preset: 30]``: a key's built-in default (the paper's
    budget) and, where it differs, the cpu preset's."""
    from qgseg.config import Config, flatten, get_key, load_preset

    value = get_key(Config(), key)
    text = f"default: {_shown(value)} ({key})"
    cpu = flatten(load_preset("cpu"), "preset cpu")
    if key in cpu and cpu[key] != value:
        text += f"; cpu preset: {_shown(cpu[key])}"
    return f" \\[{text}]"  # escaped: the help is Rich markup


class _Command(TyperCommand):
    """--help shows the built-in default of every option that sets a config key (not visible
    otherwise: the options default to None so that a preset or config file can set them)."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        for p in self.params:
            key = OPTION_KEYS.get(p.name or "")
            if key and "default:" not in (p.help or ""):
                p.help = (p.help or "") + default_help(key)
        super().format_help(ctx, formatter)


def _version(value: bool) -> None:
    if value:
        import qgseg

        print(f"qgseg {qgseg.__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", is_eager=True,
                                          callback=_version)] = False,
) -> None:
    pass


_running: list[Callable] = []  # the command function being run (see command())


def _option_names() -> dict[str, str]:
    """config key -> the option of the running command that sets it, read from the command's
    annotations (``--epochs`` for train.epochs in ssl, for quality.epochs in train-quality)."""
    import typing

    if not _running:
        return {}
    try:
        hints = typing.get_type_hints(_running[-1], include_extras=True)
    except Exception:  # noqa: BLE001 - only error messages depend on it
        return {}
    out = {}
    for name, hint in hints.items():
        for meta in getattr(hint, "__metadata__", ()):
            # typer.Option("--epochs", "-e"): in Annotated form the first name is held as `default`
            decls = [getattr(meta, "default", None), *(getattr(meta, "param_decls", None) or ())]
            long = [d for d in decls if isinstance(d, str) and d.startswith("--")]
            if name in OPTION_KEYS and long:
                out[OPTION_KEYS[name]] = long[0].split("/")[0]
    return out


class Ctx:
    """What every command needs: the resolved config and output switches."""

    def __init__(self, loaded, json_out: bool, quiet: bool, debug: bool):
        self.loaded = loaded
        self.config = loaded.config
        self.json = json_out
        self.quiet = quiet
        self.debug = debug


def _setup(preset: str | None, config: Path | None, sets: list[str] | None, options: dict[str, Any],
           json_out: bool, quiet: bool, debug: bool, stage: str | None = None) -> Ctx:
    """Resolve the configuration and, for a new run of ``stage``, check its data paths (no torch yet)."""
    from qgseg.config import load_config
    from qgseg.report import setup_logging

    setup_logging(quiet=quiet or json_out and not sys.stderr.isatty(), debug=debug)
    check = None
    if stage:
        from qgseg.checks import preflight

        def check(provisional):  # before the method's module (and torch) is imported by load_config
            preflight(stage, provisional)
    loaded = load_config(preset=preset, config_file=config, options=options, sets=sets or [], check=check,
                         option_names=_option_names())
    return Ctx(loaded, json_out, quiet, debug)


def _sigterm(signum, frame):  # pragma: no cover - exercised through subprocess tests
    raise KeyboardInterrupt


def command(fn: Callable) -> Callable:
    """Wrap a command: map errors to exit codes and one clear line on stderr."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = bool(kwargs.get("debug"))
        previous = None
        _running.append(fn)
        try:
            if threading_main():  # SIGTERM (kill, schedulers) ends a run like Ctrl-C: checkpoint, 130
                previous = signal.signal(signal.SIGTERM, _sigterm)
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            print("qgseg: interrupted; continue with --resume", file=sys.stderr)
            raise typer.Exit(130)
        except QgsegError as e:
            if debug:
                traceback.print_exc()
            print(f"qgseg: error: {_one_line(str(e))}", file=sys.stderr)
            raise typer.Exit(e.exit_code)
        except Exception as e:  # noqa: BLE001 - the last line of defence
            if debug:
                traceback.print_exc()
            else:
                print(f"qgseg: error: {type(e).__name__}: {_one_line(str(e))} (run with --debug for the "
                      "traceback)", file=sys.stderr)
            raise typer.Exit(1)
        finally:
            _running.pop()
            if previous is not None:  # in-process callers (tests, notebooks) keep their own handler
                signal.signal(signal.SIGTERM, previous)

    return wrapper


def _one_line(message: str) -> str:
    """Errors are one line on stderr (library messages from torch etc. can span several)."""
    return " ".join(message.split())


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _emit(json_out: bool, result: dict[str, Any], render: Callable[[], Any], quiet: bool = False) -> None:
    """The result on stdout: one JSON document (--json), else a table (none with --quiet)."""
    from qgseg.report import print_json, stdout_console

    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun rank 0 prints the result
    if json_out:
        print_json(result)
    elif not quiet:
        out = render()
        if out is not None:
            stdout_console().print(out)
    undefined = result.get("key_metrics_undefined") if isinstance(result, dict) else None
    if undefined:  # finished, but the numbers that matter are not defined: say so and exit 3
        for w in result.get("warnings", []):
            print(f"qgseg: warning: {_one_line(w)}", file=sys.stderr)
        print(f"qgseg: warning: {result.get('run') or result.get('out', '')}: completed with undefined key "
              f"metrics ({', '.join(undefined)}); exit code 3", file=sys.stderr)
        raise typer.Exit(EXIT_UNDEFINED)


# ---------------------------------------------------------------------------------------------
# synth
# ---------------------------------------------------------------------------------------------
@app.command(cls=_Command)
@command
def synth(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write labeled/ and unlabeled/ into.")] = Path("data/synth"),
    n_labeled: Annotated[int, typer.Option("--n-labeled", min=3, help="Labeled image/mask pairs.")] = 60,
    n_unlabeled: Annotated[int, typer.Option("--n-unlabeled", min=0, help="Unlabeled images (shifted domain).")] = 120,
    size: Annotated[int, typer.Option("--size", min=32, help="Image side in pixels.")] = 128,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Random seed.")] = 0,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Write the built-in synthetic dermoscopy-like data set (labeled + shifted unlabeled)."""
    from qgseg import synth as synth_mod
    from qgseg.report import kv_table, setup_logging

    setup_logging(quiet, debug)
    result = synth_mod.generate(out, n_labeled=n_labeled, n_unlabeled=n_unlabeled, size=size, seed=seed)
    _emit(json_out, result, lambda: kv_table("synthetic data", result), quiet=quiet)


# ---------------------------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------------------------
@app.command(cls=_Command)
@command
def inspect(
    folder: Annotated[Path, typer.Argument(help="Labeled data folder.")],
    image_size: SizeOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Show what a labeled data set holds: layout, pairs, sizes, mask coverage, problems."""
    from qgseg.data import MIN_PAIRS, describe, discover_labeled, scan_labeled
    from qgseg.report import kv_table, setup_logging, stdout_console

    setup_logging(quiet, debug)
    data, problems = scan_labeled(folder, 64 if image_size is None else image_size)
    if data is not None:
        result: dict[str, Any] = describe(data)
        if len(data) < MIN_PAIRS:  # what every training command refuses
            problems.append(f"{folder}: {len(data)} labeled pairs; at least {MIN_PAIRS} are needed for "
                            "train/val/test splits")
    else:  # some files are unreadable: still say what was found
        layout, pairs, _ = discover_labeled(folder)
        result = {"root": str(folder), "layout": layout, "pairs": len(pairs)}
    result["usable"] = not problems
    result["problems"] = problems
    if json_out:
        from qgseg.report import print_json

        print_json(result)
    elif not quiet:
        shown = {k: v for k, v in result.items() if k != "problems"}
        con = stdout_console()
        con.print(kv_table(f"dataset {folder}", shown))
        for p in problems[:50]:
            con.print(f"[red]problem:[/red] {p}", highlight=False)
        if len(problems) > 50:
            con.print(f"... and {len(problems) - 50} more problems")
    if problems:
        print(f"qgseg: error: {folder}: {len(problems)} problem(s); first: {problems[0]}", file=sys.stderr)
        raise typer.Exit(2)


# ---------------------------------------------------------------------------------------------
# ssl
# ---------------------------------------------------------------------------------------------
class _SSLCommand(_Command):
    """ssl's --method help lists the registered methods (qgseg/methods) when the help is shown."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        from qgseg.methods import method_names  # the registry; imports no torch

        names = method_names()
        for p in self.params:
            if p.name == "method":
                p.help = ", ".join(names[:-1]) + " or " + names[-1] + "."
        super().format_help(ctx, formatter)


@app.command(cls=_SSLCommand)
@command
def ssl(
    method: Annotated[Optional[str], typer.Option("--method", "-m", help="An SSL method (qgseg/methods).")] = None,
    qw: Annotated[Optional[bool], typer.Option("--qw/--no-qw", help="Weight each unlabeled sample's loss by g(x, pseudolabel) (pseudolabel methods).")] = None,
    qar_weight: Annotated[Optional[float], typer.Option("--qar-weight", help="Add lambda_qar * (1 - g(x_u, f(x_u))) to any method (qar: 0.01).")] = None,
    quality: QualityOpt("train-quality run with g (default: the newest compatible one: completed, same image size, trained on the same data set first).") = None,
    arch: Annotated[Optional[str], typer.Option("--arch", help="unetpp, attention-unet, swin-unet, unet or any smp architecture.")] = None,
    encoder: Annotated[Optional[str], typer.Option("--encoder", help="smp encoder name (default: the architecture's).")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="Maximum epochs (train.epochs).")] = None,
    labeled: LabeledOpt = None, unlabeled: UnlabeledOpt = None, image_size: SizeOpt = None,
    config: ConfigOpt = None, preset: PresetOpt = None, sets: SetOpt = None, out: OutOpt = None,
    seed: SeedOpt = None, device: DeviceOpt = None, json_out: JsonOpt = False, quiet: QuietOpt = False,
    debug: DebugOpt = False, resume: ResumeOpt = False,
) -> None:
    """Phase 2: train a segmenter on labeled + unlabeled images (optionally guided by g), test it."""
    opts = config_options(locals())
    if arch is not None and encoder is None:
        opts["model.encoder"] = ""  # --arch alone: that architecture's default encoder
    ctx = _setup(preset, config, sets, opts, json_out, quiet, debug, stage=None if resume else "ssl")
    from qgseg.report import Reporter, kv_table, mean_se_str  # after the checks: errors answer without torch
    from qgseg.ssl import run_ssl

    run, summary = run_ssl(ctx.loaded, out=out, resume=resume, reporter=Reporter(quiet=quiet))

    def render():
        s = summary
        shown: dict[str, Any] = {
            "method": s["method"] + (" + QW" if s["qw"] else "") + (f" + QAR {s['qar_weight']:g}"
                                                                      if s["qar_weight"] and s["method"] != "qar" else "")
            + (" (unlabeled term never on: trained like sup)" if s["method"] not in ("sup", "qar")
               and s.get("unlabeled_term_epochs") == 0 else ""),
            "model": f"{s['arch']}{' / ' + s['encoder'] if s['encoder'] else ''} ({s['parameters'] / 1e6:.2f}M parameters)",
            "test DSC": mean_se_str(s.get("test_dsc"), s.get("test_dsc_se") or 0.0),
            "test IoU": mean_se_str(s.get("test_iou"), s.get("test_iou_se") or 0.0),
            "test HD95 (px)": mean_se_str(s.get("test_hd95"), s.get("test_hd95_se") or 0.0, 2)
            + (f" ({s['test_hd95_undefined']} undefined)" if s.get("test_hd95_undefined") else ""),
        }
        if s.get("test_pred_quality") is not None:
            shown["predicted quality g"] = mean_se_str(s["test_pred_quality"], s.get("test_pred_quality_se") or 0.0)
            shown["corr(g, DSC)"] = s["test_quality_pearson"] if s.get("test_quality_pearson") is not None else "-"
        shown.update({"test cases": s["n_test"], "train / val / unlabeled": f"{s['n_train']} / {s['n_val']} / "
                      f"{s['n_unlabeled']}", "best epoch": f"{s['best_epoch']} of {s['epochs_run']} (val DSC "
                      f"{s['best_val_dsc']:.4f})", "g": s["quality_run"] or "-", "run": s["run"]})
        return kv_table("ssl: test results (mean ± standard error over cases)", shown)

    _emit(json_out, summary, render, quiet=quiet)


# ---------------------------------------------------------------------------------------------
# phase 1
# ---------------------------------------------------------------------------------------------
def _summary_table(title: str, summary: dict[str, Any], skip: tuple[str, ...] = ()) -> Any:
    from qgseg.report import kv_table

    return kv_table(title, {k: v for k, v in summary.items() if k not in skip})


_REAL_ROWS = (  # (metric key, what it says); each for g, the segmenter's confidence and its flip agreement
    ("pearson", "Pearson with the true Dice"),
    ("spearman", "Spearman with the true Dice"),
    ("spearman_dice_ge_0.8", "Spearman among masks with true Dice >= 0.8"),
    ("pairwise_accuracy", "same-image pairs put in the right order"),
    ("aurc", "AURC, failure = Dice < 0.8 (lower is better)"),
)


def _real_table(summary: dict[str, Any], splits: tuple[str, ...]) -> Any:
    """g against the two signals that need no g, on real predictions (train-quality and evaluate)."""
    from qgseg.report import rows_table

    cols, rows = ["metric"], []
    for sp in splits:
        name = f"{sp.rstrip('_')}: " if sp else ""
        cols += [f"{name}g", f"{name}confidence", f"{name}agreement"]
    for key, text in _REAL_ROWS:
        rows.append([text] + [summary.get(f"{sp}real_{sig}{key}") for sp in splits
                              for sig in ("", "confidence_", "agreement_")])
    for key, text in (("masks", "masks"), ("mean_dice", "mean true Dice"),
                      ("failure_rate", "failure rate (a random ranking's AURC)"),
                      ("aurc_oracle", "AURC of the perfect ranking"), ("mae", "g's MAE")):
        vals = []
        for sp in splits:
            v = summary.get(f"{sp}real_{key}")
            vals += [f"{v} ({summary.get(f'{sp}real_images')} images)" if key == "masks" else v, "", ""]
        rows.append([text] + vals)
    title = (f"real predictions of segmenters that never saw the images ({summary.get('real_weak_run', '')}): "
             "g against the segmenter's confidence and flip agreement")
    return rows_table(title, cols, rows)


@app.command(cls=_Command)
@command
def corrupt(
    labeled: LabeledOpt = None,
    k: KOpt = None,
    weak: WeakOpt = None,
    p_weak: Annotated[Optional[float], typer.Option("--p-weak", help="Probability of a Type 2 (weak model) mask.")] = None,
    image_size: SizeOpt = None,
    config: ConfigOpt = None, preset: PresetOpt = None, sets: SetOpt = None, out: OutOpt = None,
    seed: SeedOpt = None, json_out: JsonOpt = False, quiet: QuietOpt = False, debug: DebugOpt = False,
    resume: ResumeOpt = False,
) -> None:
    """Materialise D_Q: K corrupted masks per training image with their Dice (plus val/test sets)."""
    from qgseg.report import rows_table

    ctx = _setup(preset, config, sets, config_options(locals()), json_out, quiet, debug,
                 stage=None if resume else "corrupt")
    from qgseg.corrupt import run_corrupt  # after the config check: config errors answer without torch
    from qgseg.report import Reporter

    # a resumed corrupt run is redone (it is seeded)
    run, summary = run_corrupt(ctx.loaded, out=out, resume=resume, reporter=Reporter(quiet=quiet))

    def render():
        from rich.console import Group

        cats = rows_table("masks per category", ["category", "masks"], sorted(summary["categories"].items()))
        qs = rows_table("Dice of D_Q (train)", ["quantile", "dice"], list(summary["dice_quantiles"].items())
                        + [("share < 0.5", summary["share_below_0.5"]), ("share > 0.9", summary["share_above_0.9"])])
        return Group(cats, qs, f"run: {summary['run']}")

    _emit(json_out, summary, render, quiet=quiet)


@app.command("train-weak", cls=_Command)
@command
def train_weak(
    labeled: LabeledOpt = None,
    epochs_at: Annotated[Optional[str], typer.Option("--epochs-at", help="Epochs after which to keep a checkpoint, e.g. 1,3,5,10,15,20.")] = None,
    image_size: SizeOpt = None,
    config: ConfigOpt = None, preset: PresetOpt = None, sets: SetOpt = None, out: OutOpt = None,
    seed: SeedOpt = None, device: DeviceOpt = None, json_out: JsonOpt = False, quiet: QuietOpt = False,
    debug: DebugOpt = False, resume: ResumeOpt = False,
) -> None:
    """Train the weak U-Net whose early checkpoints give Type 2 corrupted masks."""
    from qgseg.config import parse_set
    from qgseg.report import Reporter, rows_table

    opts = config_options(locals())
    if epochs_at is not None:
        opts.update(parse_set([f"weak.epochs_at={epochs_at}"]))
    ctx = _setup(preset, config, sets, opts, json_out, quiet, debug, stage=None if resume else "train-weak")
    from qgseg.weak import run_train_weak

    run, summary = run_train_weak(ctx.loaded, out=out, resume=resume, reporter=Reporter(quiet=quiet))
    rows = [(c["epoch"], c["train_dice"], c["val_dice"], c["test_dice"]) for c in summary["checkpoints"]]
    _emit(json_out, summary, lambda: rows_table(f"weak checkpoints ({summary['run']})",
                                                ["epoch", "train Dice", "val Dice", "test Dice"], rows), quiet=quiet)


@app.command("train-quality", cls=_Command)
@command
def train_quality(
    labeled: LabeledOpt = None,
    corrupt_run: Annotated[Optional[str], typer.Option("--corrupt", help="corrupt run with D_Q (default: generate it).")] = None,
    weak: WeakOpt = None,
    backbone: Annotated[Optional[str], typer.Option("--backbone", help="timm backbone of g, e.g. resnet18.")] = None,
    quality_epochs: Annotated[Optional[int], typer.Option("--epochs", help="Maximum epochs (quality.epochs).")] = None,
    k: KOpt = None,
    weights_file: Annotated[Optional[str], typer.Option("--weights-file", help="Local pretrained weights for the backbone.")] = None,
    resample: Annotated[Optional[bool], typer.Option("--resample/--no-resample", help="Fresh corruptions every epoch after the first (quality.resample; cpu preset: on).")] = None,
    image_size: SizeOpt = None,
    config: ConfigOpt = None, preset: PresetOpt = None, sets: SetOpt = None, out: OutOpt = None,
    seed: SeedOpt = None, device: DeviceOpt = None, json_out: JsonOpt = False, quiet: QuietOpt = False,
    debug: DebugOpt = False, resume: ResumeOpt = False,
) -> None:
    """Train the quality predictor g(image, mask) ~ Dice and test its grounding in the image."""
    from qgseg.report import Reporter

    ctx = _setup(preset, config, sets, config_options(locals()), json_out, quiet, debug,
                 stage=None if resume else "train-quality")
    from qgseg.train_quality import run_train_quality

    run, summary = run_train_quality(ctx.loaded, out=out, resume=resume, reporter=Reporter(quiet=quiet))
    def render():
        from rich.console import Group

        plain = {k: v for k, v in summary.items() if "real_" not in k or k == "real_note"}
        table = _summary_table(f"quality predictor g ({summary['run']})", plain, skip=("run", "stage"))
        if "test_real_masks" not in summary:
            return table
        return Group(table, _real_table(summary, ("val_", "test_")))

    _emit(json_out, summary, render, quiet=quiet)


# ---------------------------------------------------------------------------------------------
# evaluate, ablate, demo
# ---------------------------------------------------------------------------------------------
@app.command(cls=_Command)
@command
def evaluate(
    run: Annotated[Path, typer.Argument(help="An ssl, train-weak or train-quality run directory.")],
    data: Annotated[Optional[Path], typer.Option("--data", help="Evaluate on all cases of another labeled data set (cross-dataset).")] = None,
    split: Annotated[str, typer.Option("--split", help="Split of the run's own data: train, val or test.")] = "test",
    checkpoint: Annotated[str, typer.Option("--checkpoint", help="best or last (train-weak runs: the last weak_eNNN.pt).")] = "best",
    quality_run: QualityOpt("train-quality run for the predicted-quality column (default: the g an ssl run was trained with, else the newest compatible one, as ssl chooses).") = None,
    weak: Annotated[Optional[str], typer.Option("--weak", help="train-quality runs: the train-weak run whose real predictions g scores (default: the one recorded with g).")] = None,
    config: ConfigOpt = None, preset: PresetOpt = None, sets: SetOpt = None, device: DeviceOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder (default: RUN/eval/<split or data set>).", rich_help_panel="Output")] = None,
    json_out: JsonOpt = False, quiet: QuietOpt = False, debug: DebugOpt = False,
) -> None:
    """Evaluate a stored run into RUN/eval/<split or data set>/: per-case metrics, summary, plots."""
    ctx = _setup(preset, config, sets, config_options(locals()), json_out, quiet, debug)
    from qgseg.evaluate import run_evaluate  # after the config check: errors answer without torch
    from qgseg.report import kv_table, mean_se_str

    _, summary = run_evaluate(ctx.loaded, run, data_dir=data, split=split, checkpoint=checkpoint, quality=quality_run,
                              out=out, weak=weak)

    def render():
        s = summary
        if s["stage"] == "train-quality":
            from rich.console import Group

            skip = ("run", "stage", "out", "mae_by_category")
            table = kv_table(f"g on {s['dataset']} ({s['run']}; output {s['out']})",
                             {k: v for k, v in s.items() if k not in skip and ("real_" not in k or k == "real_note")})
            return Group(table, _real_table(s, ("",))) if "real_masks" in s else table
        shown: dict[str, Any] = {"run": s["run"], "checkpoint": s["checkpoint"], "cases": s["cases"],
                                 "DSC": mean_se_str(s.get("dsc"), s.get("dsc_se") or 0.0),
                                 "IoU": mean_se_str(s.get("iou"), s.get("iou_se") or 0.0),
                                 "HD95 (px)": mean_se_str(s.get("hd95"), s.get("hd95_se") or 0.0, 2)
                                 + (f" ({s['hd95_undefined']} undefined)" if s.get("hd95_undefined") else "")}
        if s.get("quality_run"):
            shown["predicted quality g"] = mean_se_str(s.get("pred_quality"), s.get("pred_quality_se") or 0.0)
            shown["Pearson(g, DSC)"] = s.get("quality_pearson")
            shown["p-value"] = s.get("quality_pearson_p")
            shown["g"] = s["quality_run"]
        elif s.get("note"):
            shown["note"] = s["note"]
        shown["output"] = s["out"]
        return kv_table(f"evaluate on {s['dataset']} (mean ± standard error over cases)", shown)

    _emit(json_out, summary, render, quiet=quiet)


# ---------------------------------------------------------------------------------------------
# predict, qc, select: use what was trained on new images
# ---------------------------------------------------------------------------------------------
FlagBelowOpt = Annotated[float, typer.Option("--flag-below", min=0.0, max=1.0, help="flag = predicted quality g below this.")]
TtaOpt = Annotated[int, typer.Option("--tta", help="Flip / rotation views the segmenter averages: 1 (off), 2, 4 or 8; above 1 adds the agreement score.")]


@app.command(cls=_Command)
@command
def predict(
    run: Annotated[Path, typer.Argument(help="An ssl or train-weak run: its trained segmenter f.")],
    images: Annotated[Path, typer.Option("--images", help="Folder of images to segment (any size; grey, RGB or RGBA).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: masks/, predictions.csv, lowest.png; a rerun skips finished images.", rich_help_panel="Output")],
    quality_run: QualityOpt("train-quality run whose g scores the masks (default: the run's own g, else the newest completed).") = None,
    tta: TtaOpt = 4,
    probs: Annotated[bool, typer.Option("--probs", help="Also write probability maps, probs/<stem>.png (p x 255).")] = False,
    flag_below: FlagBelowOpt = 0.7,
    checkpoint: Annotated[str, typer.Option("--checkpoint", help="best or last (train-weak runs: the last weak_eNNN.pt).")] = "best",
    config: ConfigOpt = None, preset: PresetOpt = None, sets: SetOpt = None, device: DeviceOpt = None,
    json_out: JsonOpt = False, quiet: QuietOpt = False, debug: DebugOpt = False,
) -> None:
    """Segment a folder of new images with a trained f; score each mask without ground truth."""
    from qgseg.predict import run_predict
    from qgseg.report import Reporter, kv_table

    ctx = _setup(preset, config, sets, config_options(locals()), json_out, quiet, debug)
    try:
        summary = run_predict(ctx.loaded, run, images, out, checkpoint=checkpoint, quality=quality_run, tta=tta,
                              probs=probs, flag_below=flag_below, reporter=Reporter(quiet=quiet or json_out))
    except KeyboardInterrupt:
        print("qgseg: interrupted; rerun the same command to continue (finished masks are kept)", file=sys.stderr)
        raise typer.Exit(130)
    _emit(json_out, summary, quiet=quiet, render=lambda: kv_table(f"predict: {summary['images_total']} images -> {summary['out']}",
                                              {k: v for k, v in summary.items() if k not in ("out", "images")}))


@app.command(cls=_Command)
@command
def qc(
    images: Annotated[Path, typer.Option("--images", help="Folder of the images the masks belong to.")],
    masks: Annotated[Path, typer.Option("--masks", help="Folder of masks from any tool, named after their images (<stem>.png, <stem>_mask.png, ...).")],
    quality_run: QualityOpt("train-quality run whose g scores the masks (default: the newest completed).") = None,
    truth: Annotated[Optional[Path], typer.Option("--truth", help="Folder of ground-truth masks: also report how well g matched the true Dice.")] = None,
    flag_below: FlagBelowOpt = 0.7,
    fail_below: Annotated[Optional[float], typer.Option("--fail-below", min=0.0, max=1.0, help="Exit with code 4 when any mask scores below this (for CI gates).")] = None,
    out: OutOpt = None, config: ConfigOpt = None, preset: PresetOpt = None, sets: SetOpt = None,
    device: DeviceOpt = None, json_out: JsonOpt = False, quiet: QuietOpt = False, debug: DebugOpt = False,
) -> None:
    """Score existing masks (any tool's) with g, worst first; optionally gate on a threshold."""
    from qgseg.qc import FAIL_EXIT_CODE, run_qc
    from qgseg.report import kv_table

    ctx = _setup(preset, config, sets, config_options(locals()), json_out, quiet, debug)
    summary = run_qc(ctx.loaded, images, masks, quality=quality_run, out=out, truth=truth, flag_below=flag_below,
                     fail_below=fail_below)

    def render():
        shown = {k: v for k, v in summary.items() if k not in ("match", "images", "masks")}
        for k, v in (summary.get("match") or {}).items():
            shown[f"truth: {k}"] = "-" if v is None else v
        return kv_table(f"qc: g on {summary['scored']} masks (worst first in {summary['csv']})", shown)

    _emit(json_out, summary, render, quiet=quiet)
    if fail_below is not None and summary["below_fail"]:
        print(f"qgseg: qc: {summary['below_fail']} of {summary['scored']} masks scored below --fail-below "
              f"{fail_below:g} (lowest: {summary['lowest'][0]}, g {summary['quality_min']:.3f})", file=sys.stderr)
        raise typer.Exit(FAIL_EXIT_CODE)


@app.command(cls=_Command)
@command
def select(
    model: Annotated[Optional[Path], typer.Option("--model", help="An ssl or train-weak run whose segmenter ranks the pool.")] = None,
    unlabeled: UnlabeledOpt = None,
    budget: Annotated[int, typer.Option("--budget", "-n", min=1, help="Images to pick (per round with --simulate).")] = 10,
    strategy: Annotated[str, typer.Option("--strategy", help="quality, confidence, agreement or random.")] = "quality",
    quality_run: QualityOpt("train-quality run for the quality strategy (default: the model run's own g, else the newest completed).") = None,
    tta: TtaOpt = 4,
    simulate: Annotated[bool, typer.Option("--simulate", help="Measure the strategies with a simulated annotation loop on --labeled data.", rich_help_panel="Simulation")] = False,
    strategies: Annotated[str, typer.Option("--strategies", help="Strategies to simulate, comma-separated.", rich_help_panel="Simulation")] = "quality,confidence,agreement,random",
    initial: Annotated[int, typer.Option("--initial", min=2, help="Labeled images at the start (a seeded subset of the training split).", rich_help_panel="Simulation")] = 10,
    rounds: Annotated[int, typer.Option("--rounds", min=1, help="Annotation rounds.", rich_help_panel="Simulation")] = 2,
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="Seeds 0..N-1 (initial subset, training, random picks).", rich_help_panel="Simulation")] = 3,
    labeled: LabeledOpt = None, image_size: SizeOpt = None,
    config: ConfigOpt = None, preset: PresetOpt = None, sets: SetOpt = None, out: OutOpt = None,
    seed: SeedOpt = None, device: DeviceOpt = None, json_out: JsonOpt = False, quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Rank unlabeled images for annotation (or, with --simulate, measure the strategies)."""
    from qgseg.errors import InputError
    from qgseg.report import kv_table, mean_se_str, rows_table

    ctx = _setup(preset, config, sets, config_options(locals()), json_out, quiet, debug)
    if simulate:
        from qgseg.selection import run_simulation

        if model is not None:
            raise InputError("--model: not used with --simulate (each round trains its own model on --labeled)")
        if not ctx.config.data.labeled:
            raise InputError("--labeled: --simulate needs a labeled data folder (or data.labeled in qgseg.toml)")
        names = [s.strip() for s in strategies.split(",") if s.strip()]
        try:
            summary = run_simulation(ctx.loaded, ctx.config.data.labeled, out=out, initial=initial, budget=budget,
                                     rounds=rounds, seeds=seeds, strategies=names, tta=tta)
        except KeyboardInterrupt:
            print("qgseg: interrupted; rerun the same command to continue (finished rounds are kept)",
                  file=sys.stderr)
            raise typer.Exit(130)
        rows = [(r["strategy"], r["round"], r["labeled"], mean_se_str(r["test_dsc"], r["test_dsc_se"] or 0.0),
                 r["picked_true_dice"] if r["picked_true_dice"] is not None else "-") for r in summary["table"]]
        _emit(json_out, summary, quiet=quiet, render=lambda: rows_table(
            f"simulated annotation: test DSC, mean ± s.e. over {summary['seeds']} seeds ({summary['out']})",
            ["strategy", "round", "labeled", "test DSC", "picked images' Dice before"], rows))
        return
    from qgseg.selection import run_select

    if model is None:
        raise InputError("--model: name the ssl or train-weak run whose segmenter ranks the images")
    if not ctx.config.data.unlabeled:
        raise InputError("--unlabeled: name the folder of images to choose from")
    summary = run_select(ctx.loaded, model, ctx.config.data.unlabeled, budget, strategy=strategy, quality=quality_run,
                         out=out, tta=tta)
    _emit(json_out, summary, quiet=quiet, render=lambda: kv_table(f"select {strategy}: {budget} of {summary['pool']} images",
                                              {k: v for k, v in summary.items() if k != "out"}))


@app.command(cls=_Command)
@command
def ablate(
    name: Annotated[str, typer.Argument(help="lambda-qar, lambda-qw, p-weak, k, backbone, arch, unlabeled-size, method or labels.")],
    values: Annotated[Optional[str], typer.Option("--values", help="Comma-separated grid (default: the sweep's own grid).")] = None,
    methods: Annotated[Optional[str], typer.Option("--methods", help="labels sweep: comma-separated methods at every label budget, NAME or NAME+qw (default: sup,pl,mt).")] = None,
    seeds: Annotated[Optional[int], typer.Option("--seeds", help="Seeds per value (default: ablate.seeds).")] = None,
    jobs: Annotated[Optional[int], typer.Option("--jobs", "-j", help="Points run in parallel processes (default: ablate.jobs).")] = None,
    quality_run: QualityOpt("train-quality run for the ssl points (default: reuse / newest / train one).") = None,
    print_commands: Annotated[bool, typer.Option("--print-commands", help="Print one shell command per unfinished point (for a job array) instead of running.")] = False,
    labeled: LabeledOpt = None, unlabeled: UnlabeledOpt = None, image_size: SizeOpt = None,
    config: ConfigOpt = None, preset: PresetOpt = None, sets: SetOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Ablate directory (default: runs/ablate/<name>).", rich_help_panel="Output")] = None,
    seed: SeedOpt = None, device: DeviceOpt = None, json_out: JsonOpt = False, quiet: QuietOpt = False,
    debug: DebugOpt = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the ablation at --out (default: runs/ablate/<name>); running the same command again does the same, --resume refuses when there is none.", rich_help_panel="Output")] = False,
) -> None:
    """Sweep one setting over values x seeds (resumable, parallel, or as cluster commands); tabulate."""
    ctx = _setup(preset, config, sets, config_options(locals()), json_out, quiet, debug)
    from qgseg.ablate import render as render_table  # after the config check: errors answer without torch
    from qgseg.ablate import run_ablate
    from qgseg.report import Reporter

    try:
        res = run_ablate(ctx.loaded, name, values=values, seeds=seeds, jobs=jobs, out=out, quality=quality_run,
                         print_commands=print_commands, reporter=Reporter(quiet=quiet), resume=resume,
                         methods=methods)
    except KeyboardInterrupt:
        print("qgseg: interrupted; the running points stopped resumably: rerun the same command to continue",
              file=sys.stderr)
        raise typer.Exit(130)
    if print_commands:
        if json_out:
            from qgseg.report import print_json

            print_json({"run": str(res.run.path), "commands": res.commands})
        else:
            for line in res.commands:
                print(line)
        if not res.commands:
            print(f"qgseg: every point of {res.run.path} is completed; run the same ablate command without "
                  "--print-commands to gather the table", file=sys.stderr)
        return
    result = res.run.summary
    _emit(json_out, result, lambda: render_table(res), quiet=quiet)
    if res.failed:
        print(f"qgseg: error: {len(res.failed)} of {len(res.points)} points did not complete (see the table and "
              f"{res.run.path / 'logs'}); rerun the same command to retry them", file=sys.stderr)
        raise typer.Exit(1)


@app.command(cls=_Command)
@command
def demo(
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for everything (default: runs/demo).", rich_help_panel="Output")] = None,
    n_labeled: Annotated[int, typer.Option("--n-labeled", min=10, help="Synthetic labeled images.")] = 60,
    n_unlabeled: Annotated[int, typer.Option("--n-unlabeled", min=2, help="Synthetic unlabeled images.")] = 80,
    preset: Annotated[str, typer.Option("--preset", help="Built-in preset the demo starts from.", rich_help_panel="Configuration")] = "demo",
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="TOML run file over the preset (./qgseg.toml is not read by the demo).", rich_help_panel="Configuration")] = None,
    sets: SetOpt = None, seed: SeedOpt = None, device: DeviceOpt = None,
    json_out: JsonOpt = False, quiet: QuietOpt = False, debug: DebugOpt = False,
) -> None:
    """The whole pipeline on synthetic data: train-weak, train-quality, six ssl runs, a Table-1 comparison."""
    from qgseg.config import load_config
    from qgseg.demo import render as render_demo
    from qgseg.demo import run_demo
    from qgseg.report import setup_logging

    # before torch loads: idle OpenMP threads must not spin, or a busy 2-core machine slows ~10x
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    setup_logging(quiet=quiet or json_out and not sys.stderr.isatty(), debug=debug)
    # the demo is self-contained: ./qgseg.toml is read only when given with --config
    loaded = load_config(preset=preset, config_file=config, options=config_options(locals()),
                         sets=sets or [], cwd=Path(__file__).parent / "presets")
    summary = run_demo(loaded, out=out, n_labeled=n_labeled, n_unlabeled=n_unlabeled, quiet=quiet)
    _emit(json_out, summary, lambda: render_demo(summary), quiet=quiet)


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------
config_app = typer.Typer(help="The resolved configuration (defaults < --preset < --config < options < --set).",
                         no_args_is_help=True, rich_markup_mode="rich")
app.add_typer(config_app, name="config")


@config_app.command("show", cls=_Command)
@command
def config_show(
    labeled: LabeledOpt = None, unlabeled: UnlabeledOpt = None, image_size: SizeOpt = None,
    method: Annotated[Optional[str], typer.Option("--method", "-m", help="An SSL method (its defaults apply).")] = None,
    config: ConfigOpt = None, preset: PresetOpt = None, sets: SetOpt = None, seed: SeedOpt = None,
    device: DeviceOpt = None, json_out: JsonOpt = False, debug: DebugOpt = False,
) -> None:
    """Print the configuration a command would run with, as TOML, with the source of each value."""
    from qgseg.config import config_sources, dumps_toml_with_sources, load_config, to_dict
    from qgseg.report import setup_logging

    setup_logging(quiet=True, debug=debug)
    loaded = load_config(preset=preset, config_file=config, options=config_options(locals()), sets=sets or [])
    if json_out:
        from qgseg.report import print_json

        print_json({"config": to_dict(loaded.config), "sources": config_sources(loaded),
                    "config_file": loaded.config_file})
    else:
        sys.stdout.write(dumps_toml_with_sources(loaded))


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    finally:
        if "qgseg.distributed" in sys.modules:  # only a stage that set it up has a process group; no torch import otherwise
            from qgseg.distributed import cleanup

            cleanup()


if __name__ == "__main__":  # pragma: no cover
    main()
