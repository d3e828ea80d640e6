"""Run by tests/test_distributed.py under torchrun: rank 1 alone sees a NaN loss at step 2.

Every rank must raise TrainingDiverged at that step (no rank may be left waiting in the gradient
all-reduce). Each rank writes its outcome to <out>/outcome-<rank>.txt ("diverged True|False" or
"finished"); a file per rank, because the ranks' prints to one shared stdout can interleave.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from qgseg import distributed
from qgseg import engine as E
from qgseg.config import dumps_toml, load_config
from qgseg.errors import TrainingDiverged
from qgseg.runs import create_run


class NanOnRank1(E.Task):
    monitor, mode, best_modules = "val", "min", ("m",)

    def __init__(self):
        torch.manual_seed(0)
        self.m = torch.nn.Linear(2, 1)
        self.modules = {"m": self.m}

    def steps_per_epoch(self):
        return 4

    def batches(self, epoch, generator):
        for _ in range(4):
            yield torch.randn(4, 2, generator=generator)

    def loss(self, batch, epoch, step):
        loss = self.m(batch).pow(2).mean()
        if distributed.rank() == 1 and step == 1:  # the second step (steps count from 0)
            loss = loss * float("nan")
        return loss, {"loss": loss.detach()}

    def evaluate(self, epoch):
        return {"val": 1.0}


def main(out: str) -> None:
    distributed.setup("cpu")
    rank = distributed.rank()
    run = create_run(Path(out) / f"r{rank}", "ssl", dumps_toml(load_config(cwd=Path(out)).config))
    task = NanOnRank1()
    opt = torch.optim.SGD(task.m.parameters(), lr=0.01)
    try:
        E.Engine(run, task, opt, None, E.FitSettings(epochs=2, patience=5, seed=0), torch.device("cpu")).fit()
        outcome = "finished"
    except TrainingDiverged as e:
        outcome = f"diverged {'step 2' in str(e)}"
    (Path(out) / f"outcome-{rank}.txt").write_text(outcome)
    distributed.cleanup()


if __name__ == "__main__":
    main(sys.argv[1])
