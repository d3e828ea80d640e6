"""Run configuration: frozen dataclasses per TOML section, layered loading, strict checking.

Precedence (later wins): built-in defaults < ``--preset NAME`` < ``--config FILE`` (default
``./qgseg.toml`` when present) < explicit command-line options < ``--set section.key=value``.
"""
from __future__ import annotations

import dataclasses
import json
import re
import sys
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from qgseg.errors import InputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib



@dataclass(frozen=True)
class DataConfig:
    labeled: str = ""
    unlabeled: str = ""
    image_size: int = 128
    split_seed: int = 0
    max_unlabeled: int = 0  # 0 = every unlabeled image (M in the paper's ablation)
    max_labeled: int = 0  # 0 = every labeled training case
    unused_as_unlabeled: bool = False  # ssl: the training cases max_labeled leaves out join the unlabeled set (masks unread)
    cache_dir: str = ""  # "" = $QGSEG_CACHE or ~/.cache/qgseg


@dataclass(frozen=True)
class CorruptConfig:
    k: int = 50
    p_weak: float = 0.05
    eval_k: int = 10  # corrupted masks per val/test image for g's evaluation
    p_fold: float = 0.0  # share of training masks that are out-of-fold predictions (needs weak.folds)
    run: str = ""  # a corrupt run to reuse; "" = generate


@dataclass(frozen=True)
class WeakConfig:
    epochs_at: tuple = (1, 3, 5, 10, 15, 20)
    batch_size: int = 16
    lr: float = 1e-3
    arch: str = "unet"
    encoder: str = "resnet18"
    run: str = ""  # a train-weak run for Type 2 masks; "" = newest completed, if any
    folds: int = 0  # out-of-fold segmenters on the training images (0 = off, else >= 2)
    fold_epochs_at: tuple = ()  # epochs after which a fold model predicts its held-out fold (() = epochs_at)


@dataclass(frozen=True)
class QualityConfig:
    backbone: str = "resnet18"
    epochs: int = 150
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 5e-4
    patience: int = 25
    grad_clip: float = 1.0
    pretrained: bool = False
    weights_file: str = ""
    loss_beta: float = 1.0  # SmoothL1 beta (1.0 = torch's default; small values approach L1, i.e. MAE)
    resample: bool = False  # fresh corruptions of the training masks every epoch (D_Q is epoch 1's)
    masks_per_epoch: int = 0  # cap on training masks per epoch, a random share each epoch (0 = all)
    input_size: int = 0  # side length g resizes its inputs to (0 = data.image_size); D_Q stays at data size
    color_jitter: float = 0.0  # per-sample brightness / contrast / saturation factors in [1 - x, 1 + x] (0 = off)
    p_lesion_free: float = 0.0  # share of training masks shown on their image with the lesion removed (target: Dice vs empty)
    select: str = "val_loss"  # best.pt: the epoch of lowest val loss (early stopping on it), or "last"
    rank_weight: float = 0.0  # weight of the pairwise ranking term over masks of one image (0 = off)
    tta_views: int = 1  # g averages its score over 1, 2, 4 or 8 flips / rotations when it scores (not in training)


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "unetpp"
    encoder: str = ""  # "" = the architecture's default (unetpp: resnet34)
    weights_file: str = ""


QW_RULES = ("power", "rank", "reject")  # ssl.qw_rule: how g's scores become QW weights (quality.qw_weights)


@dataclass(frozen=True)
class SSLConfig:
    method: str = "sup"
    qw: bool = False
    quality: str = ""  # train-quality run; "" = newest completed
    quality_views: int = 0  # flip / rotation views g averages when it scores here (0 = as saved with g)
    lambda_final: float = 0.25
    warmup: int = 15
    rampup: int = 30
    qar_weight: float = 0.0  # 0 = no QAR term; method "qar" defaults to 0.01
    qar_warmup: int = 30
    qar_rampup: int = 40
    qw_rule: str = "power"  # power: the paper's q^T (qw_form); rank: rank in the batch; reject: drop the worst tail
    qw_form: str = "reference"  # power rule: reference q^T [q >= thr], normalised by sum(w); plain: q, mean
    qw_temperature: float = 2.0
    qw_threshold: float = 0.5
    qw_reject: float = 0.25  # reject rule: share of each batch's lowest-scored pseudolabels given weight 0
    ema_decay: float = 0.999
    confidence: float = 0.9  # pl-t / pl-c pixel confidence threshold


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 200
    batch_size: int = 32
    batch_size_unlabeled: int = 64
    lr: float = 1e-4
    weight_decay: float = 1e-4
    patience: int = 30
    grad_clip: float = 1.0
    precision: str = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU
    channels_last: bool = False
    compile: bool = False
    steps_per_epoch: int = 0  # > 0: fixed; 0 = labeled_passes over the labeled set, else max(labeled, unlabeled) batches
    labeled_passes: float = 0.0  # > 0: an epoch is this many passes over the labeled training set
    min_steps_per_epoch: int = 0  # floor on the steps of an epoch that is not fixed (few labels)
    stop_after_ramps: bool = False  # ssl: no early stop before the unlabeled / QAR terms had `patience` epochs at full weight


@dataclass(frozen=True)
class AblateConfig:
    seeds: int = 3
    jobs: int = 1


@dataclass(frozen=True)
class Config:
    seed: int = 0
    device: str = "auto"
    runs_root: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    corrupt: CorruptConfig = field(default_factory=CorruptConfig)
    weak: WeakConfig = field(default_factory=WeakConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ablate: AblateConfig = field(default_factory=AblateConfig)

    def replace(self, **dotted: Any) -> "Config":
        """A copy with ``section.key`` values replaced (checked like any other source)."""
        tree = merge(to_dict(self), dotted, "replace")
        _apply_method_defaults(tree, dotted)  # as in load_config
        return build_config(tree, "replace")


_SECTION_CLASSES: dict[str, type] = {
    "data": DataConfig, "corrupt": CorruptConfig, "weak": WeakConfig, "quality": QualityConfig,
    "model": ModelConfig, "ssl": SSLConfig, "train": TrainConfig, "ablate": AblateConfig,
}
_TOP_KEYS = ("seed", "device", "runs_root")

# Range checks: key -> (predicate, what is expected).
_CHECKS: dict[str, tuple[Any, str]] = {
    "seed": (lambda v: v >= 0, "an integer >= 0"),
    "device": (lambda v: v in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", v) is not None,
               "auto, cpu, cuda or cuda:N"),
    "data.image_size": (lambda v: v >= 32 and v % 32 == 0, "a multiple of 32, at least 32"),
    "data.split_seed": (lambda v: v >= 0, "an integer >= 0"),
    "data.max_unlabeled": (lambda v: v >= 0, "an integer >= 0 (0 = all)"),
    "data.max_labeled": (lambda v: v >= 0, "an integer >= 0 (0 = all)"),
    "corrupt.k": (lambda v: v >= 1, "an integer >= 1"),
    "corrupt.p_weak": (lambda v: 0.0 <= v <= 1.0, "a probability in [0, 1]"),
    "corrupt.eval_k": (lambda v: v >= 1, "an integer >= 1"),
    "corrupt.p_fold": (lambda v: 0.0 <= v <= 1.0, "a probability in [0, 1]"),
    "weak.epochs_at": (lambda v: len(v) > 0 and all(isinstance(e, int) and not isinstance(e, bool) and e >= 1 for e in v)
                       and list(v) == sorted(set(v)), "increasing epoch numbers >= 1, e.g. [1, 3, 5]"),
    "weak.batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "weak.folds": (lambda v: v == 0 or v >= 2, "0 (off) or an integer >= 2"),
    "weak.fold_epochs_at": (lambda v: all(isinstance(e, int) and not isinstance(e, bool) and e >= 1 for e in v)
                            and list(v) == sorted(set(v)), "increasing epoch numbers >= 1, or [] for weak.epochs_at"),
    "weak.lr": (lambda v: v > 0, "a number > 0"),
    "quality.epochs": (lambda v: v >= 1, "an integer >= 1"),
    "quality.batch_size": (lambda v: v >= 2, "an integer >= 2"),
    "quality.lr": (lambda v: v > 0, "a number > 0"),
    "quality.weight_decay": (lambda v: v >= 0, "a number >= 0"),
    "quality.patience": (lambda v: v >= 1, "an integer >= 1"),
    "quality.grad_clip": (lambda v: v >= 0, "a number >= 0 (0 = off)"),
    "quality.loss_beta": (lambda v: v > 0, "a number > 0"),
    "quality.masks_per_epoch": (lambda v: v >= 0, "an integer >= 0 (0 = all of D_Q's training masks)"),
    "quality.color_jitter": (lambda v: 0.0 <= v < 1.0, "a number in [0, 1) (0 = off)"),
    "quality.p_lesion_free": (lambda v: 0.0 <= v < 1.0, "a probability in [0, 1)"),
    "quality.rank_weight": (lambda v: v >= 0, "a number >= 0 (0 = off)"),
    "quality.select": (lambda v: v in ("val_loss", "last"), "val_loss or last"),
    "quality.tta_views": (lambda v: v in (1, 2, 4, 8), "1, 2, 4 or 8 (1 = off)"),
    "quality.input_size": (lambda v: v == 0 or (v >= 32 and v % 32 == 0),
                           "0 (the data's image size) or a multiple of 32, at least 32"),
    "ssl.method": (lambda v: v in _method_names(), lambda: "one of " + ", ".join(_method_names())),
    "ssl.lambda_final": (lambda v: v >= 0, "a number >= 0"),
    "ssl.warmup": (lambda v: v >= 0, "an integer >= 0"),
    "ssl.rampup": (lambda v: v >= 0, "an integer >= 0"),
    "ssl.qar_weight": (lambda v: v >= 0, "a number >= 0"),
    "ssl.qar_warmup": (lambda v: v >= 0, "an integer >= 0"),
    "ssl.qar_rampup": (lambda v: v >= 0, "an integer >= 0"),
    "ssl.qw_rule": (lambda v: v in QW_RULES, "power, rank or reject"),
    "ssl.qw_form": (lambda v: v in ("reference", "plain"), "reference or plain"),
    "ssl.qw_temperature": (lambda v: v > 0, "a number > 0"),
    "ssl.qw_threshold": (lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]"),
    "ssl.qw_reject": (lambda v: 0.0 <= v < 1.0, "a share in [0, 1)"),
    "ssl.quality_views": (lambda v: v in (0, 1, 2, 4, 8), "0 (as saved with g), 1, 2, 4 or 8"),
    "ssl.ema_decay": (lambda v: 0.0 < v < 1.0, "a number in (0, 1)"),
    "ssl.confidence": (lambda v: 0.5 <= v < 1.0, "a number in [0.5, 1)"),
    "train.epochs": (lambda v: v >= 1, "an integer >= 1"),
    "train.batch_size": (lambda v: v >= 2, "an integer >= 2 (BatchNorm needs two samples)"),
    "train.batch_size_unlabeled": (lambda v: v >= 2, "an integer >= 2"),
    "train.lr": (lambda v: v > 0, "a number > 0"),
    "train.weight_decay": (lambda v: v >= 0, "a number >= 0"),
    "train.patience": (lambda v: v >= 1, "an integer >= 1"),
    "train.grad_clip": (lambda v: v >= 0, "a number >= 0 (0 = off)"),
    "train.precision": (lambda v: v in ("auto", "fp32", "bf16", "fp16"), "auto, fp32, bf16 or fp16"),
    "train.steps_per_epoch": (lambda v: v >= 0, "an integer >= 0 (0 = from train.labeled_passes or the data)"),
    "train.labeled_passes": (lambda v: v >= 0, "a number >= 0 (0 = max(labeled, unlabeled) batches an epoch)"),
    "train.min_steps_per_epoch": (lambda v: v >= 0, "an integer >= 0 (0 = no floor)"),
    "ablate.seeds": (lambda v: v >= 1, "an integer >= 1"),
    "ablate.jobs": (lambda v: v >= 1, "an integer >= 1"),
}


def _method_names() -> tuple[str, ...]:
    from qgseg.methods import method_names  # the registry itself; imports no torch

    return method_names()


def _apply_method_defaults(tree: dict[str, Any], given: Iterable[str]) -> None:
    """The selected method's config defaults (``Method.defaults``, e.g. qar's ssl.qar_weight = 0.01),
    for each key not ``given`` and still at its built-in default. An unknown method is left to the
    range check."""
    name = tree["ssl"]["method"]
    if name not in _method_names():
        return
    from qgseg.methods import get_method

    given = set(given)
    for dotted, value in get_method(name).defaults.items():
        sec, key = dotted.split(".", 1)
        if dotted not in given and tree[sec][key] == _default_of(dotted):
            tree[sec][key] = value


def method_settings(name: str, cfg: Config) -> dict[str, Any]:
    """``section.key`` values that switch a configuration to method ``name`` (ablate, demo).

    Keys some method brings defaults for (``ssl.qar_weight``) keep the configuration's value when
    it is set (non-zero) and this method has a default for them, take the method's default when
    not, and go back to the built-in default for a method without one.
    """
    from qgseg.methods import get_method

    method = get_method(name)
    out: dict[str, Any] = {"ssl.method": name}
    for key in sorted({k for n in _method_names() for k in get_method(n).defaults}):
        if key in method.defaults:
            out[key] = get_key(cfg, key) or method.defaults[key]
        else:
            out[key] = get_key(Config(), key)
    return out


def get_key(cfg: Config, dotted: str) -> Any:
    """The value of ``section.key`` (or a top-level key) in a config."""
    if "." in dotted:
        sec, key = dotted.split(".", 1)
        return getattr(getattr(cfg, sec), key)
    return getattr(cfg, dotted)


def to_dict(cfg: Config) -> dict[str, Any]:
    """Nested plain dict (tuples become lists) of a config."""
    out = dataclasses.asdict(cfg)
    for sec in _SECTION_CLASSES:
        for k, v in out[sec].items():
            if isinstance(v, tuple):
                out[sec][k] = list(v)
    return out


def valid_keys() -> list[str]:
    keys = list(_TOP_KEYS)
    for sec, cls in _SECTION_CLASSES.items():
        keys += [f"{sec}.{f.name}" for f in fields(cls)]
    return keys


def _default_of(dotted: str) -> Any:
    d = to_dict(Config())
    if "." in dotted:
        sec, key = dotted.split(".", 1)
        return d[sec][key]
    return d[dotted]


def _check_type(dotted: str, value: Any, source: str) -> Any:
    default = _default_of(dotted)
    expected = type(default)
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
    elif isinstance(default, list):
        if isinstance(value, (list, tuple)):
            return list(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return [value]
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
             list: "a list"}
    raise InputError(f"{source}: {dotted} must be {names.get(expected, expected.__name__)}, "
                     f"got {value!r}")


def flatten(tree: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Turn a TOML-like nested mapping into ``{"section.key": value}``, rejecting unknown keys."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if key in _SECTION_CLASSES:
            if not isinstance(value, Mapping):
                raise InputError(f"{source}: [{key}] must be a table of keys")
            valid = [f.name for f in fields(_SECTION_CLASSES[key])]
            for sub, v in value.items():
                if sub not in valid:
                    raise InputError(f"{source}: unknown key '{key}.{sub}'; valid keys in [{key}]: "
                                     + ", ".join(valid))
                flat[f"{key}.{sub}"] = v
        elif key in _TOP_KEYS:
            flat[key] = value
        else:
            raise InputError(f"{source}: unknown key '{key}'; valid top-level keys and sections: "
                             + ", ".join(list(_TOP_KEYS) + list(_SECTION_CLASSES)))
    return flat


def merge(base: dict[str, Any], flat: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Apply dotted overrides to a nested dict, type-checking each value."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    valid = set(valid_keys())
    for dotted, value in flat.items():
        if dotted not in valid:
            sec = dotted.split(".", 1)[0]
            choices = [k for k in valid if k.startswith(sec + ".")] or sorted(valid)
            raise InputError(f"{source}: unknown key '{dotted}'; valid keys: " + ", ".join(choices))
        value = _check_type(dotted, value, source)
        if "." in dotted:
            sec, key = dotted.split(".", 1)
            out[sec][key] = value
        else:
            out[dotted] = value
    return out


def build_config(tree: Mapping[str, Any], source: str = "configuration",
                 sources: Mapping[str, str] | None = None) -> Config:
    """Construct and range-check a Config from a complete nested dict.

    An out-of-range value is reported with the source that set it (``sources``: dotted key ->
    source label, e.g. "--set" or "config file X"), else with ``source``.
    """
    for dotted, (ok, expected) in _CHECKS.items():
        if "." in dotted:
            sec, key = dotted.split(".", 1)
            value = tree[sec][key]
        else:
            value = tree[dotted]
        if not ok(value):
            expected = expected() if callable(expected) else expected
            where = (sources or {}).get(dotted) or source
            where = "command-line option" if where == "option" else where
            raise InputError(f"{where}: {dotted} = {value!r} is out of range; expected {expected}")
    sections = {}
    for sec, cls in _SECTION_CLASSES.items():
        vals = {k: (tuple(v) if isinstance(v, list) else v) for k, v in tree[sec].items()}
        sections[sec] = cls(**vals)
    return Config(**{k: tree[k] for k in _TOP_KEYS}, **sections)


def read_toml(path: Path, what: str = "config file") -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is not TOML
    except FileNotFoundError:
        raise InputError(f"{what} {path}: file not found") from None
    except OSError as e:
        raise InputError(f"{what} {path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise InputError(f"{what} {path}: not UTF-8 text (a TOML file is expected)") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{what} {path}: TOML syntax error: {e}") from None


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("qgseg.presets").iterdir()
                  if p.name.endswith(".toml"))


def load_preset(name: str) -> dict[str, Any]:
    if name not in preset_names():
        raise InputError(f"--preset: unknown preset '{name}'; choose from " + ", ".join(preset_names()))
    text = resources.files("qgseg.presets").joinpath(f"{name}.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


def parse_set(items: Iterable[str]) -> dict[str, Any]:
    """Parse ``--set section.key=value`` items; values are TOML literals, bare words are strings."""
    flat: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise InputError(f"--set {item}: expected section.key=value")
        key, raw = item.split("=", 1)
        key, raw = key.strip(), raw.strip()
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        # string keys take the text as given: a folder or run named "2024" stays a string
        if isinstance(_safe_default(key), str) and not isinstance(value, str):
            value = raw
        # "1,3,5" for list-valued keys
        if isinstance(value, str) and "," in value and isinstance(_safe_default(key), list):
            try:
                value = [int(x) for x in value.split(",") if x.strip()]
            except ValueError:
                pass
        flat[key] = value
    return flat


def _safe_default(key: str) -> Any:
    try:
        return _default_of(key)
    except (KeyError, TypeError):  # unknown section/key, or a sub-key of a scalar ("seed.x")
        return None


@dataclass
class Loaded:
    """A resolved config plus where each explicitly set key came from."""

    config: Config
    explicit: dict[str, str]  # dotted key -> source label
    config_file: str = ""


def load_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    options: Mapping[str, Any] | None = None,
    sets: Iterable[str] = (),
    cwd: Path | None = None,
    check: Callable[[Loaded], None] | None = None,
    option_names: Mapping[str, str] | None = None,
) -> Loaded:
    """Resolve a configuration from all sources (see module docstring).

    ``option_names`` (config key -> command-line option, e.g. "--epochs") names the option in
    an error about a value it set.

    ``check`` is called with the configuration before the selected method's defaults are
    applied: the method's module imports torch, so checks that need no method (data folders)
    answer in about a second there.
    """
    tree = to_dict(Config())
    explicit: dict[str, str] = {}
    layers: list[tuple[str, dict[str, Any]]] = []
    if preset:
        layers.append((f"preset {preset}", flatten(load_preset(preset), f"preset {preset}")))
    used_file = ""
    if config_file is None:
        default = (cwd or Path.cwd()) / "qgseg.toml"
        if default.is_file():
            config_file = default
    if config_file is not None:
        used_file = str(config_file)
        data = read_toml(Path(config_file))
        flat = flatten(data, f"config file {config_file}")
        # relative data paths in a config file are relative to the file
        base = Path(config_file).resolve().parent
        for key in ("data.labeled", "data.unlabeled", "data.cache_dir", "quality.weights_file",
                    "model.weights_file"):
            if isinstance(flat.get(key), str) and flat[key]:
                p = Path(flat[key]).expanduser()
                flat[key] = str(p if p.is_absolute() else base / p)
        layers.append((f"config file {config_file}", flat))
    if options:
        layers.append(("option", {k: v for k, v in options.items() if v is not None}))
    set_flat = parse_set(sets)
    layers.append(("--set", set_flat))
    for source, flat in layers:
        tree = merge(tree, flat, source)
        for k in flat:
            explicit[k] = source
    named = {k: (option_names or {}).get(k, v) if v == "option" else v for k, v in explicit.items()}
    if check is not None:  # range checks too (an unknown method), all before torch loads
        check(Loaded(build_config(tree, source=_describe(explicit), sources=named), explicit, used_file))
    _apply_method_defaults(tree, explicit)  # e.g. method qar brings lambda_qar = 0.01 unless set
    cfg = build_config(tree, source=_describe(explicit), sources=named)
    _check_method_keys(cfg, explicit)
    return Loaded(cfg, explicit, used_file)


def _check_method_keys(cfg: Config, explicit: Mapping[str, str]) -> None:
    """The keys the selected method needs > 0 (``Method.positive``)."""
    from qgseg.methods import get_method

    for dotted in get_method(cfg.ssl.method).positive:
        if get_key(cfg, dotted) <= 0:
            raise InputError(f"{explicit.get(dotted, 'configuration')}: {dotted} must be > 0 for method "
                             f"{cfg.ssl.method}")


def _describe(explicit: Mapping[str, str]) -> str:
    sources = sorted(set(explicit.values()) - {"--set"})
    return "configuration" if not sources else "configuration (" + "; ".join(sources) + ")"


def dumps_toml(cfg: Config) -> str:
    """Serialise a config as TOML (scalars and flat lists only, which is all a Config holds)."""
    d = to_dict(cfg)
    lines = [f"{k} = {_toml_value(d[k])}" for k in _TOP_KEYS]
    for sec in _SECTION_CLASSES:
        lines += ["", f"[{sec}]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in d[sec].items()]
    return "\n".join(lines) + "\n"


def config_sources(loaded: "Loaded") -> dict[str, str]:
    """Where each key's value came from: default, preset NAME, config file X, option, --set,
    or the selected method's default."""
    src = {k: "default" for k in valid_keys()}
    src.update(loaded.explicit)
    if loaded.config.ssl.method in _method_names():
        from qgseg.methods import get_method

        for dotted, value in get_method(loaded.config.ssl.method).defaults.items():
            if dotted not in loaded.explicit and get_key(loaded.config, dotted) == value:
                src[dotted] = f"default of method {loaded.config.ssl.method}"
    return src


def dumps_toml_with_sources(loaded: "Loaded") -> str:
    """The resolved configuration as TOML, each value followed by where it came from
    (``# default``, ``# preset cpu``, ``# config file X``, ``# option``, ``# --set``)."""
    d = to_dict(loaded.config)
    src = config_sources(loaded)

    def line(key: str, dotted: str, value: Any) -> str:
        return f"{key} = {_toml_value(value)}  # {src.get(dotted, 'default')}"

    lines = [line(k, k, d[k]) for k in _TOP_KEYS]
    for sec in _SECTION_CLASSES:
        lines += ["", f"[{sec}]"]
        lines += [line(k, f"{sec}.{k}", v) for k, v in d[sec].items()]
    return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        # JSON string escapes are valid TOML basic-string escapes; TOML also forbids a raw DEL
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def load_run_config(run_dir: Path) -> Config:
    """The resolved config a run directory was made with."""
    path = Path(run_dir) / "config.toml"
    data = read_toml(path, "run config")
    return build_config(merge(to_dict(Config()), flatten(data, str(path)), str(path)), str(path))
