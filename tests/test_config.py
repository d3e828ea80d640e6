"""Configuration: defaults, layered precedence, strict keys, types, ranges, TOML round trip."""
from __future__ import annotations

from pathlib import Path

import pytest

from qgseg import config as C
from qgseg.config import Config, dumps_toml, load_config, parse_set
from qgseg.errors import InputError


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _load(tmp_path: Path, **kw) -> C.Loaded:
    """load_config with an empty cwd, so a qgseg.toml of the real cwd never leaks in."""
    kw.setdefault("cwd", tmp_path)
    return load_config(**kw)


# ------------------------------------------------------------------------------ defaults
def test_defaults_follow_the_design(tmp_path):
    cfg = _load(tmp_path).config
    assert cfg == Config()
    assert (cfg.seed, cfg.device) == (0, "auto")
    assert cfg.corrupt.k == 50 and cfg.corrupt.p_weak == 0.05
    assert cfg.weak.epochs_at == (1, 3, 5, 10, 15, 20)
    assert (cfg.quality.backbone, cfg.quality.lr, cfg.quality.batch_size) == ("resnet18", 3e-4, 32)
    assert (cfg.model.arch, cfg.model.encoder) == ("unetpp", "")  # "" = the arch default (resnet34)
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.batch_size_unlabeled) == (1e-4, 32, 64)
    assert (cfg.ssl.method, cfg.ssl.qw, cfg.ssl.qar_weight) == ("sup", False, 0.0)
    assert (cfg.ssl.lambda_final, cfg.ssl.warmup, cfg.ssl.rampup) == (0.25, 15, 30)
    assert cfg.ablate.seeds == 3
    assert _load(tmp_path).explicit == {}


def test_config_is_frozen():
    with pytest.raises(Exception):
        Config().seed = 3  # type: ignore[misc]


def test_builtin_presets_load():
    assert {"cpu", "paper"} <= set(C.preset_names())
    for name in C.preset_names():
        cfg = load_config(preset=name, cwd=Path("/nonexistent-dir")).config
        assert isinstance(cfg, Config)
    assert load_config(preset="cpu", cwd=Path("/nonexistent-dir")).config.data.image_size == 96


def test_unknown_preset_lists_choices(tmp_path):
    with pytest.raises(InputError, match=r"--preset.*'nope'.*cpu.*paper"):
        _load(tmp_path, preset="nope")


# ---------------------------------------------------------------------------- precedence
def test_precedence_defaults_preset_file_options_set(tmp_path):
    # cpu preset sets train.epochs 10, train.lr 1e-3, train.patience 6, data.image_size 96
    cfg_file = _write(tmp_path / "run.toml", "[train]\nepochs = 7\nlr = 0.002\n[data]\nimage_size = 64\n")
    loaded = _load(tmp_path, preset="cpu", config_file=cfg_file,
                   options={"train.lr": 0.005, "data.image_size": 160, "seed": None},
                   sets=["data.image_size=192"])
    cfg = loaded.config
    assert cfg.train.patience == 6  # preset over default (30)
    assert cfg.train.epochs == 7  # file over preset
    assert cfg.train.lr == 0.005  # option over file
    assert cfg.data.image_size == 192  # --set over option
    assert cfg.seed == 0  # an option left as None does not override
    assert cfg.train.batch_size_unlabeled == 16  # preset, nothing later
    assert cfg.ssl.method == "sup"  # default
    assert loaded.explicit["train.epochs"].startswith("config file")
    assert loaded.explicit["train.lr"] == "option"
    assert loaded.explicit["data.image_size"] == "--set"
    assert loaded.explicit["train.patience"] == "preset cpu"
    assert "seed" not in loaded.explicit
    assert loaded.config_file == str(cfg_file)


def test_qgseg_toml_in_cwd_is_picked_up(tmp_path, monkeypatch):
    _write(tmp_path / "qgseg.toml", "seed = 11\n[corrupt]\nk = 7\n")
    loaded = _load(tmp_path)
    assert loaded.config.seed == 11 and loaded.config.corrupt.k == 7
    assert Path(loaded.config_file).name == "qgseg.toml"
    # also through the process cwd (what the CLI does)
    monkeypatch.chdir(tmp_path)
    assert load_config().config.corrupt.k == 7
    # an explicit --config wins over ./qgseg.toml
    other = _write(tmp_path / "sub" / "other.toml", "[corrupt]\nk = 3\n")
    assert load_config(config_file=other).config.corrupt.k == 3


def test_missing_config_file_names_it(tmp_path):
    with pytest.raises(InputError, match=r"nope\.toml.*not found"):
        _load(tmp_path, config_file=tmp_path / "nope.toml")


def test_toml_syntax_error_names_the_file(tmp_path):
    bad = _write(tmp_path / "broken.toml", "[train]\nepochs = = 3\n")
    with pytest.raises(InputError) as e:
        _load(tmp_path, config_file=bad)
    msg = str(e.value)
    assert str(bad) in msg and "TOML" in msg and "\n" not in msg


# -------------------------------------------------------------------------- unknown keys
def test_unknown_key_in_file_names_key_and_lists_valid(tmp_path):
    bad = _write(tmp_path / "typo.toml", "[train]\nepohcs = 3\n")
    with pytest.raises(InputError) as e:
        _load(tmp_path, config_file=bad)
    msg = str(e.value)
    assert str(bad) in msg and "train.epohcs" in msg
    assert "epochs" in msg and "batch_size_unlabeled" in msg


def test_unknown_section_and_top_level_key_in_file(tmp_path):
    with pytest.raises(InputError, match=r"unknown key 'trian'.*train"):
        _load(tmp_path, config_file=_write(tmp_path / "a.toml", "[trian]\nepochs = 3\n"))
    with pytest.raises(InputError, match=r"unknown key 'sed'.*seed"):
        _load(tmp_path, config_file=_write(tmp_path / "b.toml", "sed = 3\n"))


def test_unknown_key_in_set_names_key_and_lists_valid(tmp_path):
    with pytest.raises(InputError) as e:
        _load(tmp_path, sets=["ssl.lamda_final=0.3"])
    msg = str(e.value)
    assert "--set" in msg and "ssl.lamda_final" in msg and "ssl.lambda_final" in msg
    with pytest.raises(InputError, match=r"'bogus'.*seed"):
        _load(tmp_path, sets=["bogus=1"])


def test_set_on_a_scalar_key_with_a_subkey_is_an_input_error(tmp_path):
    # "seed" is a scalar: seed.x must be reported as an unknown key, not crash
    for item in ("seed.x=1", "seed.x=a,b", "data.image_size.x=1,2"):
        with pytest.raises(InputError, match=r"unknown key"):
            _load(tmp_path, sets=[item])


def test_set_without_equals(tmp_path):
    with pytest.raises(InputError, match=r"--set train\.epochs.*section\.key=value"):
        _load(tmp_path, sets=["train.epochs"])


# ----------------------------------------------------------------------------- types
@pytest.mark.parametrize("text, key", [
    ("[train]\nepochs = \"ten\"\n", "train.epochs"),
    ("[train]\nepochs = 2.5\n", "train.epochs"),
    ("[train]\nlr = \"fast\"\n", "train.lr"),
    ("[ssl]\nqw = 1\n", "ssl.qw"),
    ("[model]\narch = 3\n", "model.arch"),
    ("[weak]\nepochs_at = \"soon\"\n", "weak.epochs_at"),
    ("seed = true\n", "seed"),
    ("[data]\nimage_size = true\n", "data.image_size"),
])
def test_wrong_types_in_file(tmp_path, text, key):
    f = _write(tmp_path / "t.toml", text)
    with pytest.raises(InputError) as e:
        _load(tmp_path, config_file=f)
    assert key in str(e.value) and str(f) in str(e.value)


def test_wrong_types_in_set_and_options(tmp_path):
    with pytest.raises(InputError, match=r"--set.*train\.batch_size must be an integer"):
        _load(tmp_path, sets=["train.batch_size=big"])
    with pytest.raises(InputError, match=r"ssl\.qw must be true or false"):
        _load(tmp_path, sets=["ssl.qw=yes"])
    with pytest.raises(InputError, match=r"option.*corrupt\.k"):
        _load(tmp_path, options={"corrupt.k": "many"})


def test_int_is_accepted_for_float_keys(tmp_path):
    cfg = _load(tmp_path, sets=["train.lr=1", "ssl.lambda_final=0"]).config
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.ssl.lambda_final == 0.0


# ----------------------------------------------------------------------------- ranges
@pytest.mark.parametrize("item, key", [
    ("ssl.lambda_final=-0.1", "ssl.lambda_final"),
    ("ssl.qar_weight=-1", "ssl.qar_weight"),
    ("corrupt.k=0", "corrupt.k"),
    ("corrupt.p_weak=1.5", "corrupt.p_weak"),
    ("corrupt.p_weak=-0.01", "corrupt.p_weak"),
    ("data.image_size=100", "data.image_size"),
    ("data.image_size=0", "data.image_size"),
    ("train.batch_size=1", "train.batch_size"),
    ("train.lr=0", "train.lr"),
    ("ssl.method=magic", "ssl.method"),
    ("device=gpu", "device"),
    ("device=cuda:x", "device"),
    ("seed=-1", "seed"),
    ("weak.epochs_at=3,1", "weak.epochs_at"),
    ("train.lr=nan", "train.lr"),
    ("quality.input_size=48", "quality.input_size"),
    ("quality.input_size=16", "quality.input_size"),
    ("quality.p_lesion_free=1", "quality.p_lesion_free"),
    ("quality.p_lesion_free=-0.1", "quality.p_lesion_free"),
    ("quality.color_jitter=1.5", "quality.color_jitter"),
    ("quality.tta_views=3", "quality.tta_views"),
    ("quality.tta_views=0", "quality.tta_views"),
    ("ssl.quality_views=3", "ssl.quality_views"),
    ("quality.select=best", "quality.select"),
    ("ssl.qw_rule=softmax", "ssl.qw_rule"),
    ("ssl.qw_reject=1", "ssl.qw_reject"),
    ("ssl.qw_reject=-0.1", "ssl.qw_reject"),
    ("train.labeled_passes=-1", "train.labeled_passes"),
    ("train.min_steps_per_epoch=-1", "train.min_steps_per_epoch"),
])
def test_out_of_range(tmp_path, item, key):
    with pytest.raises(InputError) as e:
        _load(tmp_path, sets=[item])
    msg = str(e.value)
    assert key in msg and "expected" in msg


def test_range_error_names_the_file_that_set_it(tmp_path):
    f = _write(tmp_path / "neg.toml", "[ssl]\nlambda_final = -1.0\n")
    with pytest.raises(InputError) as e:
        _load(tmp_path, config_file=f)
    assert "ssl.lambda_final" in str(e.value) and str(f) in str(e.value)


@pytest.mark.parametrize("item", ["corrupt.p_weak=0", "corrupt.p_weak=1", "data.image_size=32",
                                  "device=cuda:1", "device=cpu", "corrupt.k=1",
                                  "quality.input_size=0", "quality.input_size=32",
                                  "quality.p_lesion_free=0", "quality.p_lesion_free=0.99",
                                  "quality.color_jitter=0", "quality.color_jitter=0.5",
                                  "quality.tta_views=1", "quality.tta_views=8",
                                  "ssl.quality_views=0", "ssl.quality_views=4",
                                  "quality.select=last", "quality.select=val_loss",
                                  "ssl.qw_rule=power", "ssl.qw_rule=rank", "ssl.qw_rule=reject",
                                  "ssl.qw_reject=0", "ssl.qw_reject=0.9", "train.labeled_passes=0.5"])
def test_range_edges_accepted(tmp_path, item):
    _load(tmp_path, sets=[item])


# ---------------------------------------------------------------------------- --set parsing
def test_parse_set_values():
    flat = parse_set(["train.epochs=5", "train.lr=1e-3", "ssl.qw=true", "ssl.method=mt",
                      "device=cuda:0", "weak.epochs_at=1,3,5", "data.labeled=data/ph2",
                      "model.encoder = resnet18", 'quality.backbone="efficientnet_b0"',
                      "weak.epochs_at=[2, 4]"])
    assert flat["train.epochs"] == 5 and isinstance(flat["train.epochs"], int)
    assert flat["train.lr"] == pytest.approx(1e-3)
    assert flat["ssl.qw"] is True
    assert flat["ssl.method"] == "mt"
    assert flat["device"] == "cuda:0"
    assert flat["weak.epochs_at"] == [2, 4]  # the later item wins
    assert flat["data.labeled"] == "data/ph2"
    assert flat["model.encoder"] == "resnet18"
    assert flat["quality.backbone"] == "efficientnet_b0"
    assert parse_set(["weak.epochs_at=1,3,5"])["weak.epochs_at"] == [1, 3, 5]
    assert parse_set(["ssl.qw=false"])["ssl.qw"] is False


def test_set_lists_and_scalars_reach_the_config(tmp_path):
    cfg = _load(tmp_path, sets=["weak.epochs_at=1,3,5", "ssl.qw=true", "train.epochs=4",
                                "ssl.method=pl", "ablate.seeds=2"]).config
    assert cfg.weak.epochs_at == (1, 3, 5)
    assert cfg.ssl.qw is True and cfg.train.epochs == 4 and cfg.ssl.method == "pl"
    assert _load(tmp_path, sets=["weak.epochs_at=4"]).config.weak.epochs_at == (4,)


def test_set_string_keys_keep_numeric_looking_text(tmp_path):
    # a folder or run named like a number is still a string
    cfg = _load(tmp_path, sets=["data.labeled=2024", "ssl.quality=20261127-142800"]).config
    assert cfg.data.labeled == "2024"
    assert cfg.ssl.quality == "20261127-142800"


# ---------------------------------------------------------------------------- round trip
def test_dumps_toml_round_trip(tmp_path):
    cfg = _load(tmp_path, preset="cpu", sets=[
        "weak.epochs_at=1,2,7", "ssl.qw=true", "ssl.method=cps", """data.labeled='C:\\data "x"'""",
        "train.lr=1e-6", "device=cuda:0", "quality.weights_file=w.pth", "ssl.qar_weight=0.125"]).config
    assert cfg.data.labeled == 'C:\\data "x"'
    text = dumps_toml(cfg)
    f = _write(tmp_path / "run" / "config.toml", text)
    back = C.load_run_config(f.parent)
    assert back == cfg
    assert dumps_toml(back) == text


def test_non_utf8_config_file_is_an_input_error(tmp_path):
    f = tmp_path / "latin1.toml"
    f.write_bytes("seed = 1 # caf\xe9\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"latin1\.toml"):
        _load(tmp_path, config_file=f)


def test_dumps_toml_escapes_control_characters(tmp_path):
    cfg = Config().replace(**{"data.labeled": "a\tb\nc"})
    f = _write(tmp_path / "r" / "config.toml", dumps_toml(cfg))
    assert C.load_run_config(f.parent).data.labeled == "a\tb\nc"


def test_replace_checks_keys_and_ranges():
    cfg = Config().replace(**{"train.epochs": 3})
    assert cfg.train.epochs == 3 and Config().train.epochs == 200
    with pytest.raises(InputError):
        Config().replace(**{"train.epoch": 3})
    with pytest.raises(InputError):
        Config().replace(**{"train.epochs": 0})


# ---------------------------------------------------------------------------- method qar
def test_method_qar_defaults_qar_weight(tmp_path):
    assert _load(tmp_path, sets=["ssl.method=qar"]).config.ssl.qar_weight == 0.01
    assert _load(tmp_path, sets=["ssl.method=qar", "ssl.qar_weight=0.05"]).config.ssl.qar_weight == 0.05
    assert _load(tmp_path, sets=["ssl.method=mt"]).config.ssl.qar_weight == 0.0
    f = _write(tmp_path / "q.toml", "[ssl]\nmethod = \"qar\"\n")
    assert _load(tmp_path, config_file=f).config.ssl.qar_weight == 0.01
    with pytest.raises(InputError, match=r"qar_weight"):
        _load(tmp_path, sets=["ssl.method=qar", "ssl.qar_weight=0"])
    # Config.replace (used for sweeps) follows the same rule
    assert Config().replace(**{"ssl.method": "qar"}).ssl.qar_weight == 0.01
    assert Config().replace(**{"ssl.method": "qar", "ssl.qar_weight": 0.2}).ssl.qar_weight == 0.2


# ---------------------------------------------------------------------------- paths
def test_relative_paths_in_file_resolve_against_the_file(tmp_path, monkeypatch):
    _write(tmp_path / "cfgs" / "run.toml",
               '[data]\nlabeled = "../data/ph2"\nunlabeled = "unl"\ncache_dir = "cache"\n'
               '[quality]\nweights_file = "w/r18.pth"\n[model]\nweights_file = "/abs/m.pth"\n')
    monkeypatch.chdir(tmp_path / "cfgs")
    cfg = load_config(config_file="run.toml").config
    base = (tmp_path / "cfgs").resolve()
    assert Path(cfg.data.labeled) == (base / "../data/ph2")
    assert Path(cfg.data.labeled).resolve() == (tmp_path / "data" / "ph2").resolve()
    assert Path(cfg.data.unlabeled) == base / "unl"
    assert Path(cfg.data.cache_dir) == base / "cache"
    assert Path(cfg.quality.weights_file) == base / "w" / "r18.pth"
    assert cfg.model.weights_file == "/abs/m.pth"


def test_relative_paths_from_options_and_set_stay_as_given(tmp_path):
    f = _write(tmp_path / "cfgs" / "run.toml", '[data]\nlabeled = "x"\n')
    cfg = _load(tmp_path, config_file=f, options={"data.labeled": "data/a"}, sets=["data.unlabeled=data/u"]).config
    assert cfg.data.labeled == "data/a" and cfg.data.unlabeled == "data/u"


def test_home_relative_path_in_file_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    f = _write(tmp_path / "cfgs" / "run.toml", '[data]\nlabeled = "~/ph2"\n')
    assert Path(_load(tmp_path, config_file=f).config.data.labeled) == tmp_path / "home" / "ph2"
