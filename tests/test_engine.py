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
