"""The command line through typer's CliRunner: help, synth, inspect, config errors, exit codes."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import pytest
import typer
from conftest import PH2, SYNTH_LABELED, needs_ph2
from typer.testing import CliRunner

from qgseg.cli import app

runner = CliRunner()
PLACEHOLDER_WORDS = ("placeholder", "todo", "not implemented", "coming soon", "tbd", "stub")


def _invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def _stderr_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def _assert_one_error_line(result, *needles: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = _stderr_lines(result)
    assert len(lines) == 1, lines
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _commands() -> dict:
    return typer.main.get_command(app).commands  # type: ignore[attr-defined]


# -------------------------------------------------------------------------------- help
def test_help_lists_real_commands_only():
    r = _invoke("--help")
    assert r.exit_code == 0
    assert "synth" in r.stdout and "inspect" in r.stdout
    low = r.stdout.lower()
    for word in PLACEHOLDER_WORDS:
        assert word not in low, word
    for name, cmd in _commands().items():
        assert name in r.stdout
        assert (cmd.help or "").strip(), f"{name} has no help text"
        assert not any(w in (cmd.help or "").lower() for w in PLACEHOLDER_WORDS), name


def test_no_arguments_shows_help():
    r = _invoke()
    assert r.exit_code in (0, 2) and "synth" in r.output


def test_unknown_command_exits_2():
    r = _invoke("frobnicate")
    assert r.exit_code == 2 and "Traceback" not in r.output


# ------------------------------------------------------------------------------- synth
def test_synth_json(tmp_path):
    out = tmp_path / "syn"
    r = _invoke("synth", "--out", out, "--n-labeled", "6", "--n-unlabeled", "4", "--size", "64", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)  # exactly one JSON document, nothing else on stdout
    assert isinstance(doc, dict) and doc["labeled"] == 6 and doc["unlabeled"] == 4 and doc["size"] == 64
    assert len(list((out / "labeled" / "images").glob("*.png"))) == 6
    assert len(list((out / "labeled" / "masks").glob("*.png"))) == 6
    assert len(list((out / "unlabeled" / "images").glob("*.png"))) == 4
    assert cv2.imread(str(out / "labeled" / "images" / "case_000.png")).shape == (64, 64, 3)


def test_synth_table(tmp_path):
    r = _invoke("synth", "--out", tmp_path / "s", "--n-labeled", "3", "--n-unlabeled", "0", "--size", "32")
    assert r.exit_code == 0, r.output
    assert "labeled" in r.stdout and "Traceback" not in r.output


def test_synth_bad_option_exits_2(tmp_path):
    r = _invoke("synth", "--out", tmp_path / "s", "--n-labeled", "1")
    assert r.exit_code == 2 and "Traceback" not in r.output


# ----------------------------------------------------------------------------- inspect
def test_inspect_json_on_synthetic_set(synth_data):
    r = _invoke("inspect", synth_data / "labeled", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["pairs"] == SYNTH_LABELED and doc["layout"] == "images/masks"
    assert doc["usable"] is True and doc["problems"] == []
    assert doc["image_sizes"] == {"64x64": SYNTH_LABELED}
    assert 0 < doc["coverage_min"] <= doc["coverage_median"] <= doc["coverage_max"] < 1


def test_inspect_table(synth_data):
    r = _invoke("inspect", synth_data / "labeled")
    assert r.exit_code == 0, r.output
    assert "images/masks" in r.stdout and str(SYNTH_LABELED) in r.stdout


@pytest.fixture
def broken_copy(synth_data, tmp_path) -> Path:
    dst = tmp_path / "broken"
    shutil.copytree(synth_data / "labeled", dst)
    return dst


def _break_size(root: Path) -> Path:
    p = root / "masks" / "case_003.png"
    m = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(p), cv2.resize(m, (48, 40), interpolation=cv2.INTER_NEAREST))
    return p


def _break_delete(root: Path) -> Path:
    (root / "masks" / "case_005.png").unlink()
    return root / "images" / "case_005.png"


def _break_truncated_jpeg(root: Path) -> Path:
    png = root / "images" / "case_007.png"
    jpg = png.with_suffix(".jpg")
    ok, buf = cv2.imencode(".jpg", cv2.imread(str(png)))
    assert ok
    jpg.write_bytes(buf.tobytes()[: len(buf) // 2])
    png.unlink()
    return jpg


@pytest.mark.parametrize("breaker", [_break_size, _break_delete, _break_truncated_jpeg],
                         ids=["mask-size", "mask-deleted", "truncated-jpeg"])
@pytest.mark.parametrize("json_out", [False, True], ids=["table", "json"])
def test_inspect_broken_copy_exits_2_naming_the_file(broken_copy, breaker, json_out):
    bad = breaker(broken_copy)
    args = ["inspect", broken_copy] + (["--json"] if json_out else [])
    r = _invoke(*args)
    _assert_one_error_line(r, str(bad))
    if json_out:
        doc = json.loads(r.stdout)
        assert doc["usable"] is False and len(doc["problems"]) == 1 and str(bad) in doc["problems"][0]


def test_inspect_bad_image_size_exits_2(synth_data):
    r = _invoke("inspect", synth_data / "labeled", "--image-size", "-8")
    _assert_one_error_line(r, "image size")


def test_inspect_missing_folder_exits_2(tmp_path):
    r = _invoke("inspect", tmp_path / "nope")
    _assert_one_error_line(r, str(tmp_path / "nope"))


@needs_ph2
def test_inspect_ph2():
    r = _invoke("inspect", PH2, "--json", "--image-size", "32")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["pairs"] == 200 and doc["usable"] is True and doc["problems"] == []


# ------------------------------------------------------------------- config errors in CLI
def _config_commands() -> list[str]:
    return sorted(n for n, c in _commands().items() if any(p.name == "config" for p in c.params))


def test_some_command_takes_config():
    assert "corrupt" in _config_commands()


def test_config_typo_exits_2_naming_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[corrupt]\nk = 5\n[train]\nepohcs = 3\n")
    r = _invoke("corrupt", "--config", bad)
    line = _assert_one_error_line(r, "train.epohcs", str(bad))
    assert "epochs" in line.replace("epohcs", "")  # lists the valid keys


def test_set_typo_and_bad_value_exit_2(tmp_path):
    r = _invoke("corrupt", "--set", "corrupt.kk=3")
    _assert_one_error_line(r, "corrupt.kk", "--set")
    r = _invoke("corrupt", "--set", "corrupt.k=0")
    _assert_one_error_line(r, "corrupt.k")


def test_toml_syntax_error_exits_2(tmp_path):
    bad = tmp_path / "syntax.toml"
    bad.write_text("[corrupt\nk = 5\n")
    _assert_one_error_line(_invoke("corrupt", "--config", bad), str(bad))


def test_qgseg_toml_in_cwd_is_used_by_the_cli(tmp_path, monkeypatch):
    (tmp_path / "qgseg.toml").write_text("[data]\nimage_sise = 64\n")
    monkeypatch.chdir(tmp_path)
    _assert_one_error_line(_invoke("corrupt"), "data.image_sise", "qgseg.toml")
