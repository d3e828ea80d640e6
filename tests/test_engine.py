"""The engine's lazy reading of logged terms (TermLog) and the fused-optimiser switch."""
from __future__ import annotations

import math

import pytest
import torch

from qgseg import engine as E


def _feed(log, losses, extra=None):
    for i, v in enumerate(losses):
        terms = {"a": torch.tensor(float(i)), "b": 2.0}
        if extra and i in extra:
            terms["c"] = torch.tensor(extra[i])
        log.add(torch.tensor(v), terms)


def test_termlog_means_over_steps_with_tensors_and_floats():
    log = E.TermLog(torch.device("cpu"))
    _feed(log, [1.0, 2.0, 3.0, 4.0], extra={1: 5.0})
    means = log.means()
    assert means["a"] == pytest.approx(1.5) and means["b"] == pytest.approx(2.0)
    # a term logged by some steps only: missing steps count as NaN, as a float NaN term does
    assert math.isnan(means["c"])
    assert log.info(3) == "epoch 3 loss 4.0000"


def test_termlog_reads_back_lazily_on_cuda_and_eagerly_on_cpu():
    cpu, cuda = E.TermLog(torch.device("cpu")), E.TermLog(torch.device("cuda"))  # only the type matters
    assert cpu.due()
    _feed(cuda, [1.0] * (E.SYNC_EVERY - 1))
    assert not cuda.due() and len(cuda.pending) == E.SYNC_EVERY - 1 and cuda.n == 0
    cuda.info(1)  # the progress line does not force a read on CUDA
    assert len(cuda.pending) == E.SYNC_EVERY - 1
    _feed(cuda, [1.0])
    assert cuda.due()
    assert cuda.first_nonfinite() is None and cuda.pending == [] and cuda.n == E.SYNC_EVERY


def test_termlog_reports_the_first_non_finite_step():
    log = E.TermLog(torch.device("cuda"))
    _feed(log, [0.5, 0.4, float("nan"), float("inf"), 0.3])
    assert log.first_nonfinite()[0] == 3 and math.isnan(log.first_nonfinite()[1])


def test_engine_names_the_step_of_a_nan_loss(tmp_path):
    from dist_nan_worker import NanOnRank1

    from qgseg.config import dumps_toml, load_config
    from qgseg.errors import TrainingDiverged
    from qgseg.runs import create_run

    run = create_run(tmp_path / "r", "ssl", dumps_toml(load_config(cwd=tmp_path).config))
    task = NanOnRank1()
    task.loss = lambda batch, epoch, step: (torch.tensor(float("nan")) if step == 2 else
                                            task.m(batch).pow(2).mean(), {})
    opt = torch.optim.SGD(task.m.parameters(), lr=0.01)
    with pytest.raises(TrainingDiverged, match=r"loss became nan at epoch 1, step 3; .*last.pt \(epoch 0\)"):
        E.Engine(run, task, opt, None, E.FitSettings(epochs=2, patience=5, seed=0), torch.device("cpu")).fit()


def test_fused_optimizer_only_on_cuda():
    assert E.fused_optimizer(torch.device("cpu")) == {}
    assert E.fused_optimizer(torch.device("cuda", 0)) == {"fused": True}


@pytest.mark.parametrize("min_epochs, stops_after", [(0, 3), (6, 6)])
def test_early_stopping_waits_for_min_epochs(tmp_path, min_epochs, stops_after):
    """patience 2 on a val metric that never improves after epoch 1: stop at epoch 3, or at
    min_epochs when that is later."""
    from dist_nan_worker import NanOnRank1  # rank 0: a plain task, constant val metric

    from qgseg.config import dumps_toml, load_config
    from qgseg.runs import create_run

    run = create_run(tmp_path / "r", "ssl", dumps_toml(load_config(cwd=tmp_path).config))
    task = NanOnRank1()
    opt = torch.optim.SGD(task.m.parameters(), lr=0.01)
    settings = E.FitSettings(epochs=10, patience=2, seed=0, min_epochs=min_epochs)
    fit = E.Engine(run, task, opt, None, settings, torch.device("cpu")).fit()
    assert fit.epochs_run == stops_after and fit.stopped_early and fit.best_epoch == 1


def test_ssl_ramps_end_counts_only_the_terms_that_are_on():
    from qgseg.config import Config
    from qgseg.methods import get_method
    from qgseg.ssl import ramps_end

    cfg = Config().replace(**{"ssl.warmup": 2, "ssl.rampup": 4, "ssl.qar_warmup": 3, "ssl.qar_rampup": 5})
    assert ramps_end(get_method("sup"), cfg) == 0
    assert ramps_end(get_method("mt"), cfg) == 6
    assert ramps_end(get_method("mt"), cfg.replace(**{"ssl.lambda_final": 0.0})) == 0
    assert ramps_end(get_method("mt"), cfg.replace(**{"ssl.qar_weight": 0.01})) == 8
    assert ramps_end(get_method("sup"), cfg.replace(**{"ssl.qar_weight": 0.01})) == 8


def test_stop_after_ramps_is_the_cpu_presets_and_not_the_papers():
    from qgseg.config import load_config

    assert load_config(preset="cpu").config.train.stop_after_ramps is True
    assert load_config(preset="paper").config.train.stop_after_ramps is False
    assert load_config().config.train.stop_after_ramps is False
