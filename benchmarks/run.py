"""Benchmark runner: SSL step times relative to sup, qgseg's loops against bare PyTorch loops,
data-wait share, corruption throughput, peak memory.

Everything timed runs in this one process on the same data, batch sizes and image size, with the
variants interleaved (round r times a few steps of every variant in turn), so the ratios stay
meaningful on a machine shared with other work: a burst of load hits all variants of a round.
A training step is what the engine does per batch (``Engine._train_epoch``): next() on
``task.batches``, autocast + ``task.loss``, the finiteness check, zero_grad, backward, gradient
clipping, the AdamW step, ``after_step`` (EMA teacher) and reading the logged terms.

    python benchmarks/run.py --out bench.json                  # everything (~35 min on 2 busy cores)
    python benchmarks/run.py --quick --out bench.json          # a smoke run (no demo; ~10 min)
    python benchmarks/run.py --sections steps --methods sup pl pl-qw --out b.json
    python benchmarks/run.py --sections bare corrupt --out b.json   # loops vs bare, corruptions (~3 min)
    python benchmarks/run.py --device cuda --arch unetpp --image-size 224 --precision bf16 \
        --channels-last --sections steps --out gpu.json

Variants: sup, pl-t, pl-c, pl, pl-qw, mt, mt-qw, ua-mt, ict, cl, cps, qar, pl-t-qw, cps-qw, and
``sup-LU`` (sup with a labeled batch of L + U images: the same number of images through f per step
as the SSL methods, to separate "more images per step" from "method overhead").

The "bare" section times three of qgseg's loops (g's train-quality step with the cpu preset's
[quality], the weak U-Net's train-weak step, sup's step) against a minimal PyTorch loop with the
same model, batch, image size, optimiser and precision (ready float tensors, forward + loss,
zero_grad, backward, step), interleaved in this process, and reports qgseg / bare.
"""
from __future__ import annotations

import os

# Before torch is imported: busy-waiting OpenMP threads slow shared cores ~10x (docs/architecture.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"

# label -> (method, qw, qar_weight)
VARIANTS: dict[str, tuple[str, bool, float]] = {
    "sup": ("sup", False, 0.0), "pl-t": ("pl-t", False, 0.0), "pl-c": ("pl-c", False, 0.0),
    "pl": ("pl", False, 0.0), "pl-qw": ("pl", True, 0.0), "mt": ("mt", False, 0.0), "mt-qw": ("mt", True, 0.0),
    "ua-mt": ("ua-mt", False, 0.0), "ict": ("ict", False, 0.0), "cl": ("cl", False, 0.0),
    "cps": ("cps", False, 0.0), "qar": ("qar", False, 0.01), "pl-t-qw": ("pl-t", True, 0.0),
    "cps-qw": ("cps", True, 0.0), "sup-LU": ("sup", False, 0.0),
}
# (label, baseline, max ratio): the performance issue's targets
TARGETS = [("pl-qw", "pl", 1.15), ("qar", "sup", 1.5), ("mt", "sup", 1.3),
           # the same limits against sup with the L + U images in its batch (same images through f)
           ("qar", "sup-LU", 1.5), ("mt", "sup-LU", 1.3)]
DATA_WAIT_TARGET = 0.10
BARE_TARGET = 1.10  # qgseg's loop / a bare PyTorch loop, per loop


# ---------------------------------------------------------------------------------------------
# machine
# ---------------------------------------------------------------------------------------------
def machine(device: torch.device) -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"nproc": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "cpu_model": model, "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
            "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def loadavg() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


# ---------------------------------------------------------------------------------------------
# step times
# ---------------------------------------------------------------------------------------------
def synthetic_data(size: int, n_labeled: int, n_unlabeled: int, seed: int = 0, unique: int = 24):
    """Labeled (LabeledData) and unlabeled (uint8 array) synthetic dermoscopy-like images.

    Only ``unique`` cases per domain are drawn and then repeated: step times do not depend on
    which images a batch holds, and drawing hundreds of 224 px cases would take a minute.
    """
    from qgseg.data import LabeledData
    from qgseg.synth import make_case

    rng = np.random.default_rng(seed)
    cases = [make_case(rng, size, "labeled") for _ in range(min(unique, n_labeled))]
    images = np.resize(np.stack([c[0] for c in cases]), (n_labeled, size, size, 3))
    masks = np.resize((np.stack([c[1] for c in cases]) > 0).astype(np.uint8), (n_labeled, size, size))
    unl = np.stack([make_case(rng, size, "unlabeled")[0] for _ in range(min(unique, n_unlabeled))])
    unl = np.resize(unl, (n_unlabeled, size, size, 3))
    data = LabeledData(Path("synthetic"), "synthetic", [f"c{i:04d}" for i in range(n_labeled)], images, masks,
                       np.full((n_labeled, 2), size, np.int32))
    return data, unl


@dataclass
class Variant:
    label: str
    task: Any
    opt: torch.optim.Optimizer
    params: list
    batches: Any
    images_per_step: int
    step: int = 0
    total: list[float] = field(default_factory=list)  # whole step (data + compute), wall seconds
    wait: list[float] = field(default_factory=list)  # next() on task.batches, wall seconds
    cpu: list[float] = field(default_factory=list)  # whole step, CPU seconds of this process (all threads)
    cpu_wait: list[float] = field(default_factory=list)  # next(), CPU seconds
    rounds: list[tuple[int, int]] = field(default_factory=list)  # (start, end) index per round
    peak_mem: int = 0
    log: Any = None  # qgseg.engine.TermLog: reads the logged terms back as the engine does


def build_variants(args, device: torch.device) -> dict[str, Variant]:
    from qgseg.config import load_config
    from qgseg.engine import TermLog
    from qgseg.methods import get_method
    from qgseg.models import build_segmenter
    from qgseg.quality import QualityPredictor, build_quality_net
    from qgseg.ssl import SSLTask, build_optimizer

    bs_l, bs_u = args.batch
    empty = Path(tempfile.mkdtemp(prefix="qgseg-bench-cfg-"))
    try:  # the cpu preset (never a ./qgseg.toml of the working directory)
        base = load_config(preset="cpu", cwd=empty).config
    finally:
        shutil.rmtree(empty, ignore_errors=True)
    n_l, n_u = max(4 * bs_l, 2 * (bs_l + bs_u)), 4 * bs_u
    data, unl = synthetic_data(args.image_size, n_l + 4, n_u)
    train, val = data.subset(data.stems[:n_l]), data.subset(data.stems[n_l:])
    torch.manual_seed(0)
    model0 = build_segmenter(args.arch, args.encoder)
    g0 = build_quality_net("resnet18").eval()  # a random g: its cost, not its judgement, is measured
    out = {}
    for label in args.methods:
        method, qw, qar = VARIANTS[label]
        big = label == "sup-LU"
        cfg = base.replace(**{
            "ssl.method": method, "ssl.qw": qw, "ssl.qar_weight": qar, "ssl.warmup": 0, "ssl.rampup": 0,
            "ssl.qar_warmup": 0, "ssl.qar_rampup": 0, "data.image_size": args.image_size,
            "model.arch": args.arch, "model.encoder": args.encoder or model0.spec["encoder"],
            "train.batch_size": bs_l + bs_u if big else bs_l, "train.batch_size_unlabeled": bs_u,
            "train.steps_per_epoch": 10 ** 9, "train.precision": args.precision,
            "train.channels_last": args.channels_last, "device": str(device)})
        m = get_method(method)
        torch.manual_seed(1)
        model = copy.deepcopy(model0).to(device)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        extras = m.build_modules(model, cfg)
        quality = None
        if qw or qar > 0:
            g = copy.deepcopy(g0).to(device)
            if args.channels_last:
                g = g.to(memory_format=torch.channels_last)
            quality = QualityPredictor(g, args.image_size)
        uses_unl = m.unlabeled is not None or qar > 0
        task = SSLTask(m, model, extras, cfg, train, val, unl if uses_unl else None, quality, device)
        opt, _ = build_optimizer(task, cfg)
        params = [p for grp in opt.param_groups for p in grp["params"]]
        for mod in task.modules.values():
            mod.train()
        batches = iter(task.batches(1, torch.Generator().manual_seed(0)))
        out[label] = Variant(label, task, opt, params, batches, task.bs_l + (task.bs_u if uses_unl else 0),
                             log=TermLog(device))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(v: Variant, device: torch.device, precision: str) -> tuple[float, float, float, float]:
    """One engine step; returns wall seconds in next(), for the whole step, then the same in CPU seconds."""
    from qgseg.engine import autocast

    t0, c0 = time.perf_counter(), time.process_time()
    batch = next(v.batches)
    _sync(device)
    t1, c1 = time.perf_counter(), time.process_time()
    with autocast(device, precision):
        loss, terms = v.task.loss(batch, 1, v.step)
    v.log.add(loss, terms)
    if v.log.due() and v.log.first_nonfinite() is not None:  # as the engine: lazily on CUDA
        raise RuntimeError(f"{v.label}: loss is not finite")
    v.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(v.params, 1.0)
    v.opt.step()
    v.step += 1
    v.task.after_step(v.step)
    v.log.info(1)  # the engine's progress line (reads the terms back every step on the CPU only)
    _sync(device)
    t2, c2 = time.perf_counter(), time.process_time()
    return t1 - t0, t2 - t0, c1 - c0, c2 - c0


def run_steps(variants: dict[str, Variant], args, device: torch.device, log) -> None:
    """Warm-up, then ``rounds`` rounds of ``steps`` interleaved steps per variant."""
    for v in variants.values():
        t = time.perf_counter()
        for _ in range(args.warmup):
            train_step(v, device, args.precision)
        log(f"warm-up {v.label}: {(time.perf_counter() - t) / max(args.warmup, 1):.3f} s/step")
    for r in range(args.rounds):
        order = list(variants.values())
        if r % 2:  # alternate the order so no variant always follows the same one
            order.reverse()
        for v in order:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = len(v.total)
            for _ in range(args.steps):
                w, t, cw, c = train_step(v, device, args.precision)
                v.wait.append(w)
                v.total.append(t)
                v.cpu_wait.append(cw)
                v.cpu.append(c)
            v.rounds.append((start, len(v.total)))
            if device.type == "cuda":
                v.peak_mem = max(v.peak_mem, torch.cuda.max_memory_allocated(device))
        log(f"round {r + 1}/{args.rounds} done (load {loadavg()[:1]})")


def _series(v: Variant, metric: str) -> list[float]:
    return v.cpu if metric == "cpu" else v.total


def _ratio(a: Variant, b: Variant, metric: str) -> tuple[float, list[float]]:
    """median(a) / median(b) over all timed steps, and the same ratio per interleaved round."""
    sa, sb = _series(a, metric), _series(b, metric)
    per_round = [statistics.median(sa[i:j]) / statistics.median(sb[k:l]) for (i, j), (k, l) in zip(a.rounds, b.rounds)]
    return statistics.median(sa) / statistics.median(sb), per_round


def step_stats(variants: dict[str, Variant], ref: str = "sup") -> dict[str, dict[str, Any]]:
    out = {}
    base = variants.get(ref)
    for label, v in variants.items():
        med = statistics.median(v.total)
        row: dict[str, Any] = {
            "method": VARIANTS[label][0], "qw": VARIANTS[label][1], "qar_weight": VARIANTS[label][2],
            "steps": len(v.total), "median_s": med, "min_s": min(v.total), "max_s": max(v.total),
            "median_cpu_s": statistics.median(v.cpu), "images_per_step": v.images_per_step,
            "images_per_s": v.images_per_step / med, "data_wait_share": sum(v.wait) / sum(v.total),
            "data_wait_share_cpu": sum(v.cpu_wait) / max(sum(v.cpu), 1e-9), "median_wait_s": statistics.median(v.wait)}
        if v.peak_mem:
            row["peak_gpu_mem_mib"] = round(v.peak_mem / 2 ** 20, 1)
        for metric, suffix in (("wall", ""), ("cpu", "_cpu")):
            if base is not None:
                r, rounds = _ratio(v, base, metric)
                row[f"ratio_vs_sup{suffix}"] = r
                row[f"ratio_rounds{suffix}"] = rounds
                row[f"ratio_min{suffix}"], row[f"ratio_max{suffix}"] = min(rounds), max(rounds)
            if "sup-LU" in variants:
                row[f"ratio_vs_sup_LU{suffix}"] = _ratio(v, variants["sup-LU"], metric)[0]
        out[label] = row
    return out


def target_checks(stats: dict[str, dict[str, Any]], variants: dict[str, Variant], metric: str) -> list[dict[str, Any]]:
    out = []
    for label, ref, limit in TARGETS:
        if label not in variants or ref not in variants:
            continue
        ratio, rounds = _ratio(variants[label], variants[ref], metric)
        other = _ratio(variants[label], variants[ref], "wall" if metric == "cpu" else "cpu")[0]
        out.append({"variant": label, "baseline": ref, "target": limit, "metric": metric, "ratio": ratio,
                    "ratio_min": min(rounds), "ratio_max": max(rounds), "ratio_other_metric": other,
                    "met": ratio <= limit})
    key = "data_wait_share_cpu" if metric == "cpu" else "data_wait_share"
    worst = max(stats, key=lambda k: stats[k][key]) if stats else None
    if worst is not None:
        out.append({"variant": "data wait (worst)", "baseline": worst, "target": DATA_WAIT_TARGET, "metric": metric,
                    "ratio": stats[worst][key], "met": stats[worst][key] < DATA_WAIT_TARGET})
    return out


# ---------------------------------------------------------------------------------------------
# qgseg's loops against a bare PyTorch loop
# ---------------------------------------------------------------------------------------------
@dataclass
class LoopPair:
    """One loop of qgseg and a bare loop with the same model, batch, size, optimiser and precision."""
    label: str
    detail: str
    qgseg: Any  # () -> (wall s, CPU s, data wall s, data CPU s) of one step
    bare: Any  # () -> (wall s, CPU s, clip CPU s) of one step
    times: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in (
        "q_wall", "q_cpu", "q_data_wall", "q_data_cpu", "b_wall", "b_cpu", "b_clip_cpu")})
    rounds: list[tuple[int, int]] = field(default_factory=list)


def _precision_ctx(device: torch.device, precision: str):
    """Plain torch.autocast for the bare loops (bf16 by default on CUDA, fp32 on the CPU)."""
    import contextlib

    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16)


def _engine_step(task, opt, params, it, log, grad_clip: float, device: torch.device, precision: str, step: list[int]):
    """What Engine._train_epoch does for one batch (single process, no GradScaler)."""
    from qgseg.engine import autocast

    t0, c0 = time.perf_counter(), time.process_time()
    batch = next(it)
    _sync(device)
    t1, c1 = time.perf_counter(), time.process_time()
    with autocast(device, precision):
        loss, terms = task.loss(batch, 1, step[0])
    log.add(loss, terms)
    if log.due() and log.first_nonfinite() is not None:
        raise RuntimeError("loss is not finite")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    step[0] += 1
    task.after_step(step[0])
    log.info(1)
    _sync(device)
    return time.perf_counter() - t0, time.process_time() - c0, t1 - t0, c1 - c0


def _bare_step(forward, opt, params, tensors, bs: int, gen: torch.Generator, device: torch.device, precision: str,
               grad_clip: float):
    """A plain loop's step: index a batch of ready float tensors, forward + loss, zero_grad, backward,
    optimiser step. The gradient clipping qgseg does is timed after it, apart (not in the step)."""
    t0, c0 = time.perf_counter(), time.process_time()
    idx = torch.randint(len(tensors[0]), (bs,), generator=gen)
    batch = [t[idx].to(device, non_blocking=True) for t in tensors]
    with _precision_ctx(device, precision):
        loss = forward(*batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    _sync(device)
    t1, c1 = time.perf_counter(), time.process_time()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        _sync(device)
    return t1 - t0, c1 - c0, time.process_time() - c1


def build_loop_pairs(args, device: torch.device) -> list[LoopPair]:
    """g's train-quality step, the weak U-Net's train-weak step and sup's step, each with its bare twin."""
    import torch.nn.functional as F

    from qgseg import data as D
    from qgseg.config import load_config
    from qgseg.corrupt import corrupt_dataset
    from qgseg.engine import TermLog, fused_optimizer, infinite
    from qgseg.losses import dice_only_loss, seg_loss
    from qgseg.models import build_segmenter
    from qgseg.quality import build_quality_net
    from qgseg.train_quality import QualityTask
    from qgseg.weak import WeakTask

    empty = Path(tempfile.mkdtemp(prefix="qgseg-bench-cfg-"))
    try:
        cfg = load_config(preset="cpu", cwd=empty).config
    finally:
        shutil.rmtree(empty, ignore_errors=True)
    size, q, w = args.image_size, cfg.quality, cfg.weak
    data, _ = synthetic_data(size, 48, 1)
    rows = {"train": np.arange(40), "val": np.arange(40, 44), "test": np.arange(44, 48)}
    sets = {s: corrupt_dataset(data.masks[r], k=4, seed=i) for i, (s, r) in enumerate(rows.items())}
    pairs = []

    # g: train-quality's step (the cpu preset's [quality]) and a bare loop over the same masks
    torch.manual_seed(0)
    g0 = build_quality_net(q.backbone, input_size=q.input_size, tta_views=q.tta_views)
    gq, gb = copy.deepcopy(g0).to(device).train(), copy.deepcopy(g0).to(device).train()
    task = QualityTask(gq, data, rows, sets, q, device)
    opt_q = torch.optim.AdamW(gq.parameters(), lr=q.lr, weight_decay=q.weight_decay, **fused_optimizer(device))
    opt_b = torch.optim.AdamW(gb.parameters(), lr=q.lr, weight_decay=q.weight_decay, **fused_optimizer(device))
    it = infinite(lambda gen: task.batches(1, gen), torch.Generator().manual_seed(0))
    tr = sets["train"]
    # plain NCHW-contiguous float tensors, as a plain loop has them (to_float_images returns the
    # uint8 HWC data's strides, i.e. channels-last, which the CPU's convolutions run faster on)
    g_tensors = (D.to_float_images(torch.from_numpy(data.images[rows["train"][tr.case]])).contiguous(),
                 D.to_float_masks(torch.from_numpy(tr.masks)), torch.from_numpy(tr.dice))
    log_q, step_q, gen_b = TermLog(device), [0], torch.Generator().manual_seed(0)
    pq_params = list(gq.parameters())
    pb_params = list(gb.parameters())
    pairs.append(LoopPair(
        "g (train-quality)", f"QualityNet {q.backbone} at {q.input_size or size} px, masks {size} px, batch {task.bs}, "
        f"AdamW, clip {q.grad_clip}",
        lambda: _engine_step(task, opt_q, pq_params, it, log_q, q.grad_clip, device, args.precision, step_q),
        lambda: _bare_step(lambda x, m, y: F.smooth_l1_loss(gb(x, m).float(), y, beta=q.loss_beta), opt_b, pb_params,
                           g_tensors, task.bs, gen_b, device, args.precision, q.grad_clip)))

    # the weak U-Net: train-weak's step (Adam, Dice loss, no clipping)
    train_idx = np.arange(40)
    torch.manual_seed(0)
    u0 = build_segmenter(w.arch, w.encoder)
    uq, ub = copy.deepcopy(u0).to(device).train(), copy.deepcopy(u0).to(device).train()
    wtask = WeakTask(uq, data, train_idx, rows["val"], w.batch_size, device, None, ())
    wopt_q = torch.optim.Adam(uq.parameters(), lr=w.lr, **fused_optimizer(device))
    wopt_b = torch.optim.Adam(ub.parameters(), lr=w.lr, **fused_optimizer(device))
    wit = infinite(lambda gen: wtask.batches(1, gen), torch.Generator().manual_seed(0))
    w_tensors = (D.to_float_images(torch.from_numpy(data.images[train_idx])).contiguous(),
                 D.to_float_masks(torch.from_numpy(data.masks[train_idx])))
    wlog, wstep, wgen = TermLog(device), [0], torch.Generator().manual_seed(0)
    wq_params, wb_params = list(uq.parameters()), list(ub.parameters())
    pairs.append(LoopPair(
        "weak U-Net (train-weak)", f"{w.arch}/{w.encoder} {size} px, batch {wtask.bs}, Adam, no clipping",
        lambda: _engine_step(wtask, wopt_q, wq_params, wit, wlog, 0.0, device, args.precision, wstep),
        lambda: _bare_step(lambda x, y: dice_only_loss(ub(x), y).mean(), wopt_b, wb_params, w_tensors, wtask.bs,
                           wgen, device, args.precision, 0.0)))

    # sup: the SSL step of the steps section (its labeled batch), and a bare loop with seg_loss
    sargs = copy.copy(args)
    sargs.methods = ["sup"]
    v = build_variants(sargs, device)["sup"]
    sb = copy.deepcopy(v.task.model).train()
    scfg = v.task.cfg
    sopt_b = torch.optim.AdamW(sb.parameters(), lr=scfg.train.lr, weight_decay=scfg.train.weight_decay,
                               **fused_optimizer(device))
    s_tensors = (D.to_float_images(v.task.lab_images).contiguous(), D.to_float_masks(v.task.lab_masks))
    sgen, sb_params = torch.Generator().manual_seed(0), list(sb.parameters())

    def sup_step():
        wait, total, cpu_wait, cpu = train_step(v, device, args.precision)
        return total, cpu, wait, cpu_wait

    pairs.append(LoopPair(
        "sup (ssl)", f"{v.task.model.spec['arch']}/{v.task.model.spec['encoder']} {size} px, batch {v.task.bs_l}, "
        "AdamW, clip 1.0",
        sup_step,
        lambda: _bare_step(lambda x, y: seg_loss(sb(x), y).mean(), sopt_b, sb_params, s_tensors, v.task.bs_l, sgen,
                           device, args.precision, 1.0)))
    return pairs


def run_bare(args, device: torch.device, log) -> dict[str, Any]:
    """Interleave qgseg's and the bare loop's steps per pair; ratios of medians and per round."""
    pairs = build_loop_pairs(args, device)
    for p in pairs:
        for _ in range(args.warmup):
            p.qgseg()
            p.bare()
    for r in range(args.rounds):
        for p in (pairs if r % 2 == 0 else pairs[::-1]):
            start = len(p.times["q_cpu"])
            for side in (("q", "b") if r % 2 == 0 else ("b", "q")):
                for _ in range(args.steps):
                    if side == "q":
                        for k, val in zip(("q_wall", "q_cpu", "q_data_wall", "q_data_cpu"), p.qgseg()):
                            p.times[k].append(val)
                    else:
                        for k, val in zip(("b_wall", "b_cpu", "b_clip_cpu"), p.bare()):
                            p.times[k].append(val)
            p.rounds.append((start, len(p.times["q_cpu"])))
        log(f"bare round {r + 1}/{args.rounds} done (load {loadavg()[:1]})")
    out = {}
    sfx = "cpu" if args.metric == "cpu" else "wall"
    for p in pairs:
        t = p.times
        qm, bm = statistics.median(t[f"q_{sfx}"]), statistics.median(t[f"b_{sfx}"])
        per_round = [statistics.median(t[f"q_{sfx}"][i:j]) / statistics.median(t[f"b_{sfx}"][i:j]) for i, j in p.rounds]
        data = statistics.median(t[f"q_data_{sfx}"])
        out[p.label] = {"detail": p.detail, "metric": args.metric, "qgseg_s": qm, "bare_s": bm, "ratio": qm / bm,
                        "ratio_min": min(per_round), "ratio_max": max(per_round),
                        "qgseg_data_s": data, "ratio_without_data": (qm - data) / bm,
                        "clip_cpu_s": statistics.median(t["b_clip_cpu"]), "target": BARE_TARGET,
                        "met": qm / bm <= BARE_TARGET, "times": t}
    return out


# ---------------------------------------------------------------------------------------------
# corruption throughput (benchmarks/bench_corrupt.py)
# ---------------------------------------------------------------------------------------------
def corruption(args, log) -> dict[str, Any]:
    import cv2

    spec = importlib.util.spec_from_file_location("bench_corrupt", Path(__file__).with_name("bench_corrupt.py"))
    bc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bc)
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)  # rates per CPU second of one thread, as bench_corrupt.py reports them
    out: dict[str, Any] = {"sizes": {}}
    try:
        for size in args.corrupt_sizes:
            masks, source = bc.load_masks(size, args.corrupt_cases)
            mix = bc.bench_mixture(masks, args.corrupt_k, args.corrupt_repeat)
            ops = bc.bench_ops(masks, args.corrupt_calls)
            out["source"] = source
            out["sizes"][str(size)] = {"cases": len(masks), "mixture": mix, "ops": ops}
            log(f"corruption {size} px: {mix['masks_per_s']:.0f} masks/CPU-s")
    finally:
        cv2.setNumThreads(threads)
    return out


# ---------------------------------------------------------------------------------------------
# peak memory of CLI runs
# ---------------------------------------------------------------------------------------------
def _qgseg() -> list[str]:
    exe = Path(sys.executable).with_name("qgseg")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "qgseg"]


# A small launcher between this (large) process and the measured command: a child's ru_maxrss starts
# at its parent's RSS at fork time (Linux keeps the high-water mark across exec), so forking the
# CLI run straight from a process holding torch and models would report at least our own RSS.
_LAUNCHER = """
import json, os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, ru = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump({"rc": os.waitstatus_to_exitcode(status), "maxrss_kib": ru.ru_maxrss,
               "cpu_s": ru.ru_utime + ru.ru_stime}, f)
"""


def run_child(cmd: list[str], cwd: Path, env: dict[str, str], log_path: Path) -> dict[str, Any]:
    """Run cmd through a small launcher; its peak RSS (os.wait4's ru_maxrss of the command alone)."""
    t = time.perf_counter()
    stats = log_path.with_suffix(".rusage.json")
    with open(log_path, "wb") as logf:
        subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, str(stats)] + cmd, cwd=cwd, env=env, stdout=logf,
                       stderr=subprocess.STDOUT)
    try:
        ru = json.loads(stats.read_text())
    except (OSError, ValueError):
        ru = {"rc": -1, "maxrss_kib": 0, "cpu_s": 0.0}
    tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
    return {"cmd": " ".join(cmd), "rc": ru["rc"], "peak_rss_mib": round(ru["maxrss_kib"] / 1024, 1),
            "wall_s": round(time.perf_counter() - t, 1), "cpu_s": round(ru["cpu_s"], 1),
            "log_tail": tail if ru["rc"] else []}


def memory(args, log) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="qgseg-bench-mem-"))
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", NO_ALBUMENTATIONS_UPDATE="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    q = _qgseg()
    out: dict[str, Any] = {"runs_dir": str(tmp), "runs": {}}
    try:
        has_demo = subprocess.run(q + ["demo", "--help"], cwd=tmp, env=env, capture_output=True).returncode == 0
        if not has_demo:
            out["runs"]["demo"] = {"skipped": "`qgseg demo` does not exist yet"}
            log("memory: `qgseg demo` does not exist yet; skipped")
        elif args.skip_demo:
            out["runs"]["demo"] = {"skipped": "--skip-demo"}
        else:
            log("memory: qgseg demo ...")
            out["runs"]["demo"] = run_child(q + ["demo", "--out", str(tmp / "demo"), "--quiet"], tmp, env,
                                            tmp / "demo.log")
        ph2, ham = SHARED / "ph2", SHARED / "ham10000-2k"
        if not (ph2.is_dir() and ham.is_dir()):
            out["runs"]["ssl"] = {"skipped": f"{ph2} or {ham} not found"}
            return out
        log("memory: qgseg train-quality (1 epoch) ...")
        tq = run_child(q + ["train-quality", "--preset", "cpu", "--set", "quality.epochs=1", "--labeled", str(ph2),
                            "--out", str(tmp / "tq"), "--device", "cpu", "--quiet"], tmp, env, tmp / "tq.log")
        out["runs"]["train-quality"] = tq
        if tq["rc"] != 0:
            out["runs"]["ssl"] = {"skipped": "train-quality failed"}
            return out
        log("memory: qgseg ssl --method mt --qw (1 epoch) ...")
        out["runs"]["ssl"] = run_child(
            q + ["ssl", "--preset", "cpu", "--method", "mt", "--qw", "--labeled", str(ph2), "--unlabeled", str(ham),
                 "--quality", str(tmp / "tq"), "--set", "train.epochs=1", "--out", str(tmp / "ssl"),
                 "--device", "cpu", "--quiet"], tmp, env, tmp / "ssl.log")
    finally:
        if not args.keep_runs:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def render(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=None if sys.stdout.isatty() else 140)
    st = result.get("steps")
    if st:
        s = st["settings"]
        t = Table(title=f"training step, {s['arch']}/{s['encoder']} {s['image_size']} px, batch {s['batch']} "
                        f"({s['device']}, {s['precision']}{', channels_last' if s['channels_last'] else ''}; "
                        f"median of {s['rounds']}x{s['steps']} interleaved steps)")
        mt = s["metric"]
        sfx = "_cpu" if mt == "cpu" else ""
        for col in ("variant", "wall s", "CPU s", f"x sup ({mt})", "spread", f"x sup-LU ({mt})", "img/s", "data wait"):
            t.add_column(col, justify="left" if col == "variant" else "right")
        gpu = any("peak_gpu_mem_mib" in r for r in st["variants"].values())
        if gpu:
            t.add_column("GPU MiB", justify="right")
        for label, r in st["variants"].items():
            row = [label, f"{r['median_s']:.3f}", f"{r['median_cpu_s']:.3f}",
                   f"{r.get('ratio_vs_sup' + sfx, float('nan')):.2f}",
                   f"{r['ratio_min' + sfx]:.2f}-{r['ratio_max' + sfx]:.2f}" if "ratio_min" in r else "",
                   f"{r['ratio_vs_sup_LU' + sfx]:.2f}" if "ratio_vs_sup_LU" in r else "",
                   f"{r['images_per_s']:.1f}", f"{100 * r['data_wait_share' + sfx]:.1f}%"]
            if gpu:
                row.append(f"{r.get('peak_gpu_mem_mib', 0):.0f}")
            t.add_row(*row)
        con.print(t)
        tt = Table(title=f"targets ({mt} time; spread = min-max over rounds)")
        for col in ("check", "vs", "target", "measured", "spread", "other metric", "met"):
            tt.add_column(col)
        for c in st["targets"]:
            pct = c["variant"].startswith("data wait")
            fmt = (lambda x: f"{100 * x:.1f}%") if pct else (lambda x: f"{x:.2f}x")
            tt.add_row(c["variant"], c["baseline"], ("< " if pct else "<= ") + fmt(c["target"]), fmt(c["ratio"]),
                       f"{fmt(c['ratio_min'])}-{fmt(c['ratio_max'])}" if "ratio_min" in c else "",
                       fmt(c["ratio_other_metric"]) if "ratio_other_metric" in c else "",
                       "[green]yes[/green]" if c["met"] else "[red]no[/red]")
        con.print(tt)
    bare = result.get("bare")
    if bare:
        mt = next(iter(bare.values()))["metric"]
        t = Table(title=f"qgseg's loop vs a bare PyTorch loop ({mt} s per step, median; interleaved)")
        for col in ("loop", "qgseg", "bare", "qgseg / bare", "spread", "without data", "data", "clip (CPU)",
                    f"<= {BARE_TARGET:.2f}x"):
            t.add_column(col, justify="left" if col == "loop" else "right")
        for label, r in bare.items():
            t.add_row(label, f"{r['qgseg_s']:.3f}", f"{r['bare_s']:.3f}", f"{r['ratio']:.2f}x",
                      f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f}", f"{r['ratio_without_data']:.2f}x",
                      f"{r['qgseg_data_s']:.3f}", f"{r['clip_cpu_s']:.3f}",
                      "[green]yes[/green]" if r["met"] else "[red]no[/red]")
        con.print(t)
        for label, r in bare.items():
            con.print(f"  {label}: {r['detail']}")
    co = result.get("corruption")
    if co:
        sizes = list(co["sizes"])
        t = Table(title=f"Type 1 corruption throughput (masks per CPU-second, one thread; {co.get('source')} masks)")
        t.add_column("operation")
        for s in sizes:
            t.add_column(f"{s} px", justify="right")
        t.add_row("[bold]mixture[/bold]", *[f"{co['sizes'][s]['mixture']['masks_per_s']:.0f}" for s in sizes])
        for name in co["sizes"][sizes[0]]["ops"]:
            t.add_row(name, *[f"{co['sizes'][s]['ops'][name]['masks_per_s']:.0f}" for s in sizes])
        con.print(t)
    mem = result.get("memory")
    if mem:
        t = Table(title="peak memory of CLI runs (RSS of the child process)")
        for col in ("run", "peak RSS MiB", "wall s", "CPU s", "note"):
            t.add_column(col)
        for name, r in mem["runs"].items():
            if "skipped" in r:
                t.add_row(name, "", "", "", "skipped: " + r["skipped"])
            else:
                t.add_row(name, f"{r['peak_rss_mib']:.0f}", f"{r['wall_s']:.0f}", f"{r['cpu_s']:.0f}",
                          "ok" if r["rc"] == 0 else f"exit {r['rc']}: {' | '.join(r['log_tail'])}")
        con.print(t)
    m = result["machine"]
    con.print(f"machine: {m['nproc']} CPUs ({m['cpu_model']}), torch {m['torch']}, {m['torch_threads']} threads, "
              f"OMP_WAIT_POLICY={m['omp_wait_policy']}; load average before {result['load_before']}, "
              f"after {result['load_after']}; {result['seconds']:.0f} s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    ap.add_argument("--sections", nargs="+", default=["steps", "bare", "corrupt", "memory"],
                    choices=["steps", "bare", "corrupt", "memory"])
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--batch", type=int, nargs=2, default=None, metavar=("LABELED", "UNLABELED"),
                    help="labeled and unlabeled batch (default: the cpu preset's 16 32)")
    ap.add_argument("--arch", default="unet")
    ap.add_argument("--encoder", default="", help="default: the architecture's")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                    help="auto: bf16 autocast on CUDA, fp32 on the CPU")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--cudnn-benchmark", action="store_true",
                    help="torch.backends.cudnn.benchmark = True (qgseg itself leaves it off)")
    ap.add_argument("--methods", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="VARIANT",
                    help="subset of: " + ", ".join(VARIANTS) + " (sup is always added)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per variant per round (default 2; --quick 1)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3; --quick 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per variant (default 2; --quick 1)")
    ap.add_argument("--metric", choices=["cpu", "wall"], default=None,
                    help="time the ratios and targets use (default: cpu = CPU seconds of this process on the CPU, "
                         "which a shared machine disturbs less; wall on CUDA)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--quick", action="store_true", help="few steps, few masks, no demo: a smoke run")
    ap.add_argument("--skip-demo", action="store_true", help="memory: leave out `qgseg demo`")
    ap.add_argument("--keep-runs", action="store_true", help="memory: keep the CLI runs' folders")
    args = ap.parse_args(argv)
    if args.batch is None:
        args.batch = [16, 32]
    q = args.quick
    args.steps = args.steps or (1 if q else 2)
    args.rounds = args.rounds or (2 if q else 3)
    args.warmup = args.warmup if args.warmup is not None else (1 if q else 2)
    args.corrupt_sizes = [128, 224]
    args.corrupt_cases, args.corrupt_k = (20, 5) if q else (100, 10)
    args.corrupt_calls, args.corrupt_repeat = (20, 2) if q else (100, 5)  # the fastest of 5 runs (after a warm-up)
    args.skip_demo = args.skip_demo or q
    if args.metric is None:
        args.metric = "wall" if args.device.startswith("cuda") else "cpu"
    if "sup" not in args.methods:
        args.methods = ["sup"] + args.methods
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))
    from qgseg.engine import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    device = resolve_device(args.device)
    log = lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    result: dict[str, Any] = {"argv": sys.argv, "machine": machine(device), "load_before": loadavg()}
    if "steps" in args.sections:
        variants = build_variants(args, device)
        run_steps(variants, args, device, log)
        stats = step_stats(variants)
        spec = next(iter(variants.values())).task.model.spec
        result["steps"] = {
            "settings": {"arch": spec["arch"], "encoder": spec["encoder"], "image_size": args.image_size,
                         "batch": f"{args.batch[0]}/{args.batch[1]}", "device": str(device),
                         "precision": args.precision, "channels_last": args.channels_last,
                         "cudnn_benchmark": args.cudnn_benchmark, "steps": args.steps,
                         "rounds": args.rounds, "warmup": args.warmup, "metric": args.metric},
            "variants": stats, "targets": target_checks(stats, variants, args.metric)}
        del variants
    if "bare" in args.sections:
        result["bare"] = run_bare(args, device, log)
    if "corrupt" in args.sections:
        result["corruption"] = corruption(args, log)
    if "memory" in args.sections:
        result["memory"] = memory(args, log)
    result["load_after"] = loadavg()
    result["seconds"] = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    render(result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
