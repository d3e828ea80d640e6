"""The ``qgseg`` command line: parse options, call the library, render the result.

stdout carries only the result (a Rich table, or one JSON document with ``--json``); logs and
progress go to stderr. Exit codes: 0 success, 1 runtime failure, 2 bad usage / config / data,
130 interrupted (after a resumable checkpoint was written).
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
from typing_extensions import Annotated

from qgseg.errors import InputError, QgsegError

log = logging.getLogger("qgseg")

app = typer.Typer(
    name="qgseg",
    help="Quality-guided semi-supervised learning for binary 2-D medical image segmentation.\n\n"
    "Phase 1 trains a quality predictor g(image, mask) ~ Dice; phase 2 uses frozen g to guide "
    "semi-supervised training (QAR loss, QW pseudolabel weights).",
    rich_markup_mode="rich",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# ---------------------------------------------------------------------------------------------
# shared options
# ---------------------------------------------------------------------------------------------
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="TOML run file (default: ./qgseg.toml if present).", rich_help_panel="Configuration")]
PresetOpt = Annotated[Optional[str], typer.Option("--preset", help="Built-in preset: paper (GPU, paper-faithful) or cpu (small, fast).", rich_help_panel="Configuration")]
SetOpt = Annotated[Optional[List[str]], typer.Option("--set", help="Override any key: --set train.epochs=5 (repeatable).", rich_help_panel="Configuration")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", "-o", help="Run directory (default: runs/<command>/<timestamp>).", rich_help_panel="Output")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Random seed.", rich_help_panel="Configuration")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="auto, cpu, cuda or cuda:N.", rich_help_panel="Configuration")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print exactly one JSON document on stdout.", rich_help_panel="Output")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors on stderr; no progress.", rich_help_panel="Output")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks.", rich_help_panel="Output")]
ResumeOpt = Annotated[Optional[str], typer.Option("--resume", help="Continue an interrupted run: a run directory, or 'latest'.", rich_help_panel="Output")]
LabeledOpt = Annotated[Optional[str], typer.Option("--labeled", help="Labeled data folder (images + masks).", rich_help_panel="Data")]
UnlabeledOpt = Annotated[Optional[str], typer.Option("--unlabeled", help="Unlabeled image folder.", rich_help_panel="Data")]
SizeOpt = Annotated[Optional[int], typer.Option("--image-size", help="Side length images are resized to.", rich_help_panel="Data")]


class Ctx:
    """What every command needs: the resolved config and output switches."""

    def __init__(self, loaded, json_out: bool, quiet: bool, debug: bool):
        self.loaded = loaded
        self.config = loaded.config
        self.json = json_out
        self.quiet = quiet
        self.debug = debug


def _setup(preset: str | None, config: Path | None, sets: list[str] | None, options: dict[str, Any],
           json_out: bool, quiet: bool, debug: bool) -> Ctx:
    from qgseg.config import load_config
    from qgseg.report import setup_logging

    setup_logging(quiet=quiet or json_out and not sys.stderr.isatty(), debug=debug)
    loaded = load_config(preset=preset, config_file=config, options=options, sets=sets or [])
    return Ctx(loaded, json_out, quiet, debug)


def _sigterm(signum, frame):  # pragma: no cover - exercised through subprocess tests
    raise KeyboardInterrupt


def command(fn: Callable) -> Callable:
    """Wrap a command: map errors to exit codes and one clear line on stderr."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = bool(kwargs.get("debug"))
        try:
            if threading_main():
                signal.signal(signal.SIGTERM, _sigterm)
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            print("qgseg: interrupted; continue with --resume", file=sys.stderr)
            raise typer.Exit(130)
        except QgsegError as e:
            if debug:
                traceback.print_exc()
            print(f"qgseg: error: {e}", file=sys.stderr)
            raise typer.Exit(e.exit_code)
        except Exception as e:  # noqa: BLE001 - the last line of defence
            if debug:
                traceback.print_exc()
            else:
                print(f"qgseg: error: {type(e).__name__}: {e} (run with --debug for the traceback)",
                      file=sys.stderr)
            raise typer.Exit(1)

    return wrapper


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _emit(json_out: bool, result: dict[str, Any], render: Callable[[], Any]) -> None:
    from qgseg.report import print_json, stdout_console

    if json_out:
        print_json(result)
    else:
        out = render()
        if out is not None:
            stdout_console().print(out)


# ---------------------------------------------------------------------------------------------
# synth
# ---------------------------------------------------------------------------------------------
@app.command()
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
    _emit(json_out, result, lambda: kv_table("synthetic data", result))


# ---------------------------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------------------------
@app.command()
@command
def inspect(
    folder: Annotated[Path, typer.Argument(help="Labeled data folder.")],
    image_size: SizeOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Show what a labeled data set holds: layout, pairs, sizes, mask coverage, problems."""
    from qgseg.data import describe, scan_labeled
    from qgseg.report import kv_table, setup_logging, stdout_console

    setup_logging(quiet, debug)
    data, problems = scan_labeled(folder, image_size or 64)
    result: dict[str, Any] = describe(data) if data is not None else {"root": str(folder), "pairs": 0}
    result["usable"] = not problems
    result["problems"] = problems
    if json_out:
        from qgseg.report import print_json

        print_json(result)
    else:
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


def main() -> None:
    """Console-script entry point."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
