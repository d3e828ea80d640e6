"""Checks on arguments, configuration and data paths that need no torch.

The CLI runs them right after the configuration is resolved, before a stage module (and torch)
is imported and before a run directory is made, so that a wrong option answers in about a
second and leaves nothing behind (docs/reliability.md).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from qgseg.errors import InputError

# methods with a loss on unlabeled images (every one but sup); QAR needs them too
_NO_UNLABELED = ("sup",)
# methods without a lambda-weighted unlabeled loss (qar's only unlabeled term is QAR itself)
_NO_UNLABELED_LOSS = ("sup", "qar")


def _name(loaded: Any, key: str, option: str) -> str:
    """How to name a config key in an error: the option when it came from one, else the key and its source."""
    source = getattr(loaded, "explicit", {}).get(key, "")
    if source == "option":
        return option
    return f"{key} ({source})" if source else key


def _folder(loaded: Any, key: str, option: str, value: str, what: str) -> None:
    if not value:
        raise InputError(f"{option}: no {what} folder given (or set {key} in qgseg.toml)")
    p = Path(value).expanduser()
    if not p.exists():
        raise InputError(f"{_name(loaded, key, option)} {value}: folder not found")
    if not p.is_dir():
        raise InputError(f"{_name(loaded, key, option)} {value}: not a folder")


def needs_unlabeled(cfg: Any) -> bool:
    return cfg.ssl.method not in _NO_UNLABELED or cfg.ssl.qar_weight > 0


def preflight(stage: str, loaded: Any) -> None:
    """Data folders each stage reads must exist (a new run; --resume uses the run's saved config)."""
    cfg = loaded.config
    if stage in ("ssl", "train-weak", "train-quality", "corrupt", "ablate"):
        _folder(loaded, "data.labeled", "--labeled", cfg.data.labeled, "labeled data")
    if cfg.data.unused_as_unlabeled and not cfg.data.max_labeled and stage == "ssl":  # ablate labels sets it per point
        raise InputError(f"{_name(loaded, 'data.unused_as_unlabeled', '--set')}: needs data.max_labeled > 0 (the "
                         "training cases it leaves out become the unlabeled images), got data.max_labeled = 0")
    in_domain_only = cfg.data.unused_as_unlabeled and not cfg.data.unlabeled  # no folder to check
    if stage == "ssl" and needs_unlabeled(cfg) and not in_domain_only or stage == "ablate" and cfg.data.unlabeled:
        _folder(loaded, "data.unlabeled", "--unlabeled", cfg.data.unlabeled, "unlabeled data")


def schedule_warnings(cfg: Any) -> list[str]:
    """Schedules that never reach a term the method is chosen for (ssl.warmup vs train.epochs)."""
    out = []
    s, epochs = cfg.ssl, cfg.train.epochs
    if s.method not in _NO_UNLABELED_LOSS and s.lambda_final > 0 and epochs <= s.warmup:
        out.append(f"ssl.warmup = {s.warmup} >= train.epochs = {epochs}: the unlabeled term of {s.method} never "
                   f"switches on, so this run trains like sup; set ssl.warmup below train.epochs (e.g. --set "
                   f"ssl.warmup={epochs // 4}) or train longer")
    if s.qar_weight > 0 and epochs <= s.qar_warmup:
        out.append(f"ssl.qar_warmup = {s.qar_warmup} >= train.epochs = {epochs}: the QAR term never switches on; "
                   f"set ssl.qar_warmup below train.epochs (e.g. --set ssl.qar_warmup={epochs // 4}) or train longer")
    return out
