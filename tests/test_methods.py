"""SSL methods and the ssl task: one optimisation step per method (with and without QW), QAR
gradients, QW weights, CPS, the EMA teacher and the lambda schedules. Tiny models at 32 px."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch

import qgseg.models
from qgseg.config import Config
from qgseg.data import LabeledData
from qgseg.errors import InputError
from qgseg.methods import METHODS, Context, get_method, qw_methods, ramp_weight

SSL_METHODS = list(METHODS)
QW_METHODS = qw_methods()
from qgseg.methods.cl import local_contrastive
from qgseg.methods.common import EMATeacher, Part, ema_decay_at
from qgseg.models import SegNet
from qgseg.quality import QualityPredictor, build_quality_net, qw_weights, weighted_mean
from qgseg.ssl import SSLTask, build_optimizer, check_config
from qgseg.synth import make_case

SIZE = 32


def tiny_segnet() -> SegNet:
    """A small smp U-Net (3 encoder levels, narrow decoder): fast on 2 CPU cores."""
    net = smp.Unet("resnet18", encoder_weights=None, encoder_depth=3, decoder_channels=(32, 16, 8), classes=1)
    return SegNet(net, "unet", "resnet18")


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cases = [make_case(rng, SIZE, "labeled") for _ in range(8)]
    images = np.stack([c[0] for c in cases])
    masks = (np.stack([c[1] for c in cases]) > 0).astype(np.uint8)
    unl = np.stack([make_case(rng, SIZE, "unlabeled")[0] for _ in range(12)])
    data = LabeledData(Path("."), "synthetic", [f"c{i}" for i in range(8)], images, masks,
                       np.full((8, 2), SIZE, np.int32))
    return {"model": tiny_segnet(), "g": build_quality_net("resnet18").eval(), "data": data, "unl": unl}


@pytest.fixture(autouse=True)
def tiny_peer(monkeypatch):
    """CPS builds its peer with models.build_segmenter: give it the tiny network too."""
    monkeypatch.setattr(qgseg.models, "build_segmenter", lambda *a, **k: tiny_segnet())


def make_cfg(method: str, qw: bool = False, qar: float = 0.0, **extra) -> Config:
    keys = {"ssl.method": method, "ssl.qw": qw, "ssl.qar_weight": qar, "ssl.warmup": 0, "ssl.rampup": 0,
            "ssl.qar_warmup": 0, "ssl.qar_rampup": 0, "data.image_size": SIZE, "model.arch": "unet",
            "model.encoder": "resnet18", "train.batch_size": 4, "train.batch_size_unlabeled": 4,
            "train.steps_per_epoch": 1, "device": "cpu"}
    keys.update(extra)
    return Config().replace(**keys)


def make_task(base, method: str, qw: bool = False, qar: float = 0.0, unlabeled: bool = True, **extra) -> SSLTask:
    cfg = make_cfg(method, qw, qar, **extra)
    m = get_method(method)
    model = copy.deepcopy(base["model"])
    extras = m.build_modules(model, cfg)
    quality = QualityPredictor(copy.deepcopy(base["g"]), SIZE) if (qw or qar > 0) else None
    data = base["data"]
    return SSLTask(m, model, extras, cfg, data.subset(data.stems[:6]), data.subset(data.stems[6:]),
                   base["unl"] if unlabeled else None, quality, torch.device("cpu"))


def first_batch(task: SSLTask, seed: int = 0):
    return next(iter(task.batches(1, torch.Generator().manual_seed(seed))))


def one_step(task: SSLTask, epoch: int = 1):
    """What the engine does for one step (train mode, loss, backward, clip, AdamW, EMA)."""
    opt, _ = build_optimizer(task, task.cfg)
    for m in task.modules.values():
        m.train()
    torch.manual_seed(1)
    loss, terms = task.loss(first_batch(task), epoch, 0)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
    opt.step()
    task.after_step(1)
    return loss, {k: float(v) for k, v in terms.items()}  # the engine reads tensors back the same way


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> bool:
    now = module.state_dict()
    return any(not torch.equal(before[k], now[k]) for k in before if before[k].is_floating_point())


CASES = [(m, False) for m in SSL_METHODS] + [(m, True) for m in QW_METHODS]


def test_registry_matches_config():
    assert list(METHODS) == ["sup", "pl-t", "pl-c", "pl", "mt", "ua-mt", "ict", "cl", "cps", "qar"]
    assert qw_methods() == ["pl-t", "pl-c", "pl", "mt", "ua-mt", "ict", "cl", "cps"]
    with pytest.raises(InputError, match="--method"):
        get_method("nope")


@pytest.mark.parametrize("method,qw", CASES, ids=[f"{m}{'-qw' if q else ''}" for m, q in CASES])
def test_one_step(base, method, qw):
    qar = 0.01 if method == "qar" else 0.0
    task = make_task(base, method, qw=qw, qar=qar)
    f0 = snapshot(task.model)
    g0 = snapshot(task.quality.net) if task.quality is not None else None
    loss, terms = one_step(task)
    assert torch.isfinite(loss)
    assert changed(f0, task.model), "f's parameters did not change"
    assert math.isfinite(terms["sup"]) and terms["sup"] > 0
    assert terms["lambda"] == (0.25 if METHODS[method].unlabeled is not None else 0.0)
    if METHODS[method].unlabeled is not None:
        assert math.isfinite(terms["unsup"])
        assert terms["total"] == pytest.approx(terms["sup"] + 0.25 * terms["unsup"], rel=1e-4, abs=1e-6)
    else:
        assert math.isnan(terms["unsup"])
    if qw:
        assert 0.0 <= terms["qw_mean"] <= 1.0 and 0.0 <= terms["qw_nonzero"] <= 1.0
    else:
        assert math.isnan(terms["qw_mean"])
    if method == "qar":
        assert terms["lambda_qar"] == pytest.approx(0.01) and 0.0 <= terms["qar"] <= 1.0
    if g0 is not None:
        assert not changed(g0, task.quality.net), "g changed"


@pytest.mark.parametrize("method", [m for m in SSL_METHODS if METHODS[m].unlabeled is not None])
def test_unlabeled_term_reaches_f(base, method):
    """The method's own unlabeled loss has a gradient in f (confidence 0.5: every pixel counts)."""
    task = make_task(base, method, **{"ssl.confidence": 0.5})
    for m in task.modules.values():
        m.train()
    xu = first_batch(task)[2]
    out = METHODS[method].unlabeled(Context(task.model, task.extras, task.cfg, 1, 1.0), xu)
    assert out.parts
    for part in out.parts:
        assert part.loss.shape == (4,) and torch.isfinite(part.loss).all()
        assert part.pseudolabel.shape == (4, 1, SIZE, SIZE)
        assert set(part.pseudolabel.unique().tolist()) <= {0.0, 1.0}
        assert not part.pseudolabel.requires_grad
    total = sum(p.loss.sum() for p in out.parts)
    grads = torch.autograd.grad(total, list(task.model.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("method", ["sup", "qar"])
def test_qw_refused_without_pseudolabels(method):
    with pytest.raises(InputError, match="--qw"):
        check_config(make_cfg(method, qw=True, qar=0.01 if method == "qar" else 0.0))


def test_qw_allowed_for_pseudolabel_methods():
    for m in QW_METHODS:
        check_config(make_cfg(m, qw=True))


def test_qar_gradient_flows_through_frozen_g(base):
    task = make_task(base, "qar", qar=0.5)
    g = task.quality.net
    g0 = snapshot(g)
    xu = first_batch(task)[2]
    task.model.train()
    task.quality.train()  # must stay in eval mode
    assert not g.training
    qar = task.quality.qar_loss(xu, torch.sigmoid(task.model(xu))).mean()
    qar.backward()
    grads = [p.grad for p in task.model.parameters() if p.grad is not None]
    assert grads and any(gr.abs().sum() > 0 for gr in grads), "QAR gives f no gradient"
    assert all(p.grad is None and not p.requires_grad for p in g.parameters())
    # a full step with QAR on: g's parameters and BatchNorm statistics stay as they were
    task.model.zero_grad()
    _, terms = one_step(task)
    assert 0.0 <= terms["qar"] <= 1.0 and terms["lambda_qar"] == 0.5
    assert not changed(g0, g)
    bn = [m for m in g.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn and all(int(m.num_batches_tracked) == int(g0[k + ".num_batches_tracked"])
                      for k, m in g.named_modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_qar_on_top_of_a_method(base):
    task = make_task(base, "pl", qw=True, qar=0.1)
    _, terms = one_step(task)
    assert math.isfinite(terms["qar"]) and math.isfinite(terms["unsup"])
    assert terms["total"] == pytest.approx(terms["sup"] + 0.25 * terms["unsup"] + 0.1 * terms["qar"], rel=1e-4)


def test_qw_weights_carry_no_gradient(base):
    task = make_task(base, "pl", qw=True)
    xu = first_batch(task)[2].requires_grad_(True)
    probs = torch.sigmoid(task.model(xu))
    w = task.quality.weights(xu, (probs > 0.5).float())
    assert w.shape == (4,) and not w.requires_grad and w.grad_fn is None
    w_soft = task.quality.weights(xu, probs)  # even a differentiable pseudolabel gives constant weights
    assert not w_soft.requires_grad
    # reference form: q^2 [q >= 0.5]; the reduction normalises by sum(w)
    q = task.quality.score(xu, (probs > 0.5).float())
    assert torch.allclose(w, q.pow(2) * (q >= 0.5).float())
    losses = torch.rand(4, requires_grad=True)
    red = weighted_mean(losses, torch.tensor([1.0, 0.0, 3.0, 0.0]))
    red.backward()
    assert torch.allclose(losses.grad, torch.tensor([0.25, 0.0, 0.75, 0.0]))


def test_qw_rules_on_hand_made_scores():
    """ssl.qw_rule: the weights of known scores, including ties and the tail cut."""
    q = torch.tensor([0.9, 0.5, 0.7, 0.3])
    assert torch.allclose(qw_weights(q), torch.tensor([0.81, 0.25, 0.49, 0.0]))  # power: q^2 [q >= 0.5]
    assert torch.allclose(qw_weights(q, "power", temperature=1.0, threshold=0.6), torch.tensor([0.9, 0, 0.7, 0]))
    assert torch.equal(qw_weights(q, "power", form="plain"), q)
    assert torch.allclose(qw_weights(q, "rank"), torch.tensor([1.0, 0.5, 0.75, 0.25]))
    # tied scores share their mean rank; a batch g cannot tell apart gets equal weights
    assert torch.allclose(qw_weights(torch.tensor([0.8, 0.8, 0.2, 0.8]), "rank"), torch.tensor([0.75, 0.75, 0.25, 0.75]))
    assert torch.allclose(qw_weights(torch.full((5,), 0.93), "rank"), torch.full((5,), 0.6))
    assert torch.equal(qw_weights(q, "reject", reject=0.25), torch.tensor([1.0, 1.0, 1.0, 0.0]))
    assert torch.equal(qw_weights(q, "reject", reject=0.5), torch.tensor([1.0, 0.0, 1.0, 0.0]))
    assert torch.equal(qw_weights(q, "reject", reject=0.2), torch.ones(4))  # floor(0.8) = 0 rejected
    assert torch.equal(qw_weights(torch.tensor([0.5, 0.5, 0.9, 0.1]), "reject", reject=0.5),
                       torch.tensor([0.0, 1.0, 1.0, 0.0]))  # a tie at the cut: batch order
    assert torch.equal(qw_weights(torch.linspace(0, 1, 10).flip(0), "reject", reject=0.3),
                       torch.tensor([1.0] * 7 + [0.0] * 3))
    with pytest.raises(ValueError, match="power, rank, reject"):
        qw_weights(q, "softmax")


@pytest.mark.parametrize("rule, form, expected", [
    ("power", "reference", (0.81 * 1 + 0.25 * 2 + 0.49 * 3) / (0.81 + 0.25 + 0.49)),
    ("power", "plain", (0.9 * 1 + 0.5 * 2 + 0.7 * 3 + 0.3 * 4) / 4),
    ("rank", "plain", (1.0 * 1 + 0.5 * 2 + 0.75 * 3 + 0.25 * 4) / 2.5),  # rank and reject normalise by sum(w)
    ("reject", "reference", (1 + 3) / 2),
])
def test_task_reduces_with_the_qw_rule(base, monkeypatch, rule, form, expected):
    """The ssl task weights a hand-made batch (known g scores and losses) by ssl.qw_rule."""
    task = make_task(base, "pl", qw=True, **{"ssl.qw_rule": rule, "ssl.qw_form": form, "ssl.qw_reject": 0.5})
    q = torch.tensor([0.9, 0.5, 0.7, 0.3])
    monkeypatch.setattr(task.quality, "score", lambda images, masks: q.clone())
    part = Part(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.zeros(4, 1, SIZE, SIZE), torch.zeros(4, 3, SIZE, SIZE))
    total, w, scores = task._reduce([part])
    assert float(total) == pytest.approx(expected) and torch.equal(scores, q)
    assert torch.equal(w, qw_weights(q, rule, form, reject=0.5))
    # two parts (CPS): each is weighted and reduced on its own, then summed
    total2, w2, _ = task._reduce([part, part])
    assert float(total2) == pytest.approx(2 * expected) and w2.shape == (8,)


def test_rank_rule_step_logs_scores_and_weights(base):
    _, terms = one_step(make_task(base, "pl", qw=True, **{"ssl.qw_rule": "rank"}))
    # four distinct scores: weights 1/4 .. 4/4, none zero; g's own scores logged beside them
    assert terms["qw_mean"] == pytest.approx(0.625) and terms["qw_nonzero"] == 1.0
    assert 0.0 <= terms["q_mean"] <= 1.0 and terms["q_std"] >= 0.0
    _, terms = one_step(make_task(base, "pl"))
    assert math.isnan(terms["q_mean"]) and math.isnan(terms["q_std"])


def test_cps_updates_both_networks(base):
    task = make_task(base, "cps", qw=True)
    f0, p0 = snapshot(task.model), snapshot(task.extras["peer"])
    assert any(not torch.equal(f0[k], p0[k]) for k in f0 if f0[k].is_floating_point()), "peer = f at init"
    _, terms = one_step(task)
    assert changed(f0, task.model) and changed(p0, task.extras["peer"])
    assert 0.0 <= terms["agreement"] <= 1.0
    out = METHODS["cps"].unlabeled(Context(task.model, task.extras, task.cfg, 1, 1.0), first_batch(task)[2])
    assert len(out.parts) == 2 and len(out.student) == 2


def test_ema_teacher_moves_towards_student():
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    teacher = EMATeacher(student, 0.999)
    assert not teacher.training and all(not p.requires_grad for p in teacher.module.parameters())
    teacher.update(student)  # first update: copy
    t_old = [p.detach().clone() for p in teacher.module.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
        student(torch.randn(2, 3, 8, 8))  # in train mode: BatchNorm running stats move
    teacher.update(student)
    d = ema_decay_at(1, 0.999)
    assert d == pytest.approx(0.5 + 0.499 / 1000)
    for old, new, s in zip(t_old, teacher.module.parameters(), student.parameters()):
        assert torch.allclose(new, d * old + (1 - d) * s, atol=1e-6)
        assert (new - s).abs().sum() < (old - s).abs().sum()
    bn_t, bn_s = teacher.module[1], student[1]
    assert torch.equal(bn_t.running_mean, bn_s.running_mean)  # buffers copied, not averaged
    assert int(teacher.n_averaged) == 2
    teacher.train()
    assert not teacher.training


def test_ema_decay_ramp():
    assert ema_decay_at(0, 0.999) == 0.5
    assert ema_decay_at(500, 0.999) == pytest.approx(0.7495)
    assert ema_decay_at(1000, 0.999) == pytest.approx(0.999)
    assert ema_decay_at(50_000, 0.99) == pytest.approx(0.99)


def test_lambda_schedule_formula():
    final, warmup, rampup = 0.25, 15, 30
    for e in range(1, 16):
        assert ramp_weight(e, final, warmup, rampup) == 0.0
    assert ramp_weight(16, final, warmup, rampup) == pytest.approx(0.25 / 30)
    assert ramp_weight(30, final, warmup, rampup) == pytest.approx(0.125)
    assert ramp_weight(45, final, warmup, rampup) == pytest.approx(0.25)
    assert ramp_weight(200, final, warmup, rampup) == pytest.approx(0.25)
    assert ramp_weight(31, 0.01, 30, 0) == 0.01 and ramp_weight(30, 0.01, 30, 0) == 0.0
    values = [ramp_weight(e, 0.01, 30, 40) for e in range(1, 201)]
    assert values == sorted(values) and values[69] == pytest.approx(0.01)


def test_task_schedules_follow_config(base):
    task = make_task(base, "mt", qar=0.02, **{"ssl.warmup": 2, "ssl.rampup": 4, "ssl.qar_warmup": 1,
                                              "ssl.qar_rampup": 2})
    assert [task.lambda_unsup(e) for e in (1, 2, 3, 6, 9)] == pytest.approx([0, 0, 0.0625, 0.25, 0.25])
    assert [task.lambda_qar(e) for e in (1, 2, 3, 4)] == pytest.approx([0, 0.01, 0.02, 0.02])
    # in the warm-up the unlabeled and QAR terms are off (not computed)
    _, terms = one_step(make_task(base, "mt", **{"ssl.warmup": 2}), epoch=1)
    assert terms["lambda"] == 0 and math.isnan(terms["unsup"]) and terms["total"] == terms["sup"]
    assert make_task(base, "sup").lambda_unsup(50) == 0.0


def test_epoch_length_and_deterministic_batches(base):
    task = make_task(base, "mt", **{"train.steps_per_epoch": 0})
    assert task.steps_per_epoch() == 3  # max(6 // 4, 12 // 4): the labeled loader cycles
    batches = list(task.batches(1, torch.Generator().manual_seed(5)))
    assert len(batches) == 3
    x, y, xu = batches[0]
    assert x.shape == (4, 3, SIZE, SIZE) and y.shape == (4, 1, SIZE, SIZE) and xu.shape == (4, 3, SIZE, SIZE)
    again = list(task.batches(1, torch.Generator().manual_seed(5)))
    assert all(torch.equal(a, b) for p, q in zip(batches, again) for a, b in zip(p, q))
    sup = make_task(base, "sup", unlabeled=False, **{"train.steps_per_epoch": 0})
    assert sup.steps_per_epoch() == 1 and next(iter(sup.batches(1, torch.Generator())))[2] is None
    assert make_task(base, "mt", **{"train.steps_per_epoch": 7}).steps_per_epoch() == 7


def test_every_method_sees_the_labeled_batches_of_sup(base):
    """Unlabeled batches have their own generator: the labeled stream (order and flips) of an
    epoch is the same with or without unlabeled images, so runs pair with sup at a seed."""
    def labeled(task):
        return [(x, y) for x, y, _ in task.batches(3, torch.Generator().manual_seed(11))]

    ref = labeled(make_task(base, "sup", unlabeled=False, **{"train.steps_per_epoch": 3}))
    for method in ("mt", "cps", "qar"):
        got = labeled(make_task(base, method, qar=0.01 if method == "qar" else 0.0, **{"train.steps_per_epoch": 3}))
        assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(ref, got, strict=True))
    # the unlabeled stream changes with the epoch's generator
    task = make_task(base, "mt")
    xu = [b[2] for b in task.batches(1, torch.Generator().manual_seed(11))]
    other = [b[2] for b in task.batches(1, torch.Generator().manual_seed(12))]
    assert not all(torch.equal(a, b) for a, b in zip(xu, other))


@pytest.mark.parametrize("passes, floor, fixed, steps", [
    (1.0, 0, 0, 2),  # ceil(6 labeled / batch 4), whatever the 12 unlabeled images
    (2.5, 0, 0, 4),  # ceil(2.5 * 6 / 4)
    (1.0, 5, 0, 5),  # few labels: the floor
    (0.0, 5, 0, 5),  # max(6 // 4, 12 // 4) = 3 < floor
    (1.0, 5, 7, 7),  # a fixed train.steps_per_epoch wins
])
def test_epoch_length_from_labeled_passes(base, passes, floor, fixed, steps):
    task = make_task(base, "mt", **{"train.steps_per_epoch": fixed, "train.labeled_passes": passes,
                                    "train.min_steps_per_epoch": floor})
    assert task.steps_per_epoch() == steps
    batches = list(task.batches(1, torch.Generator().manual_seed(0)))
    assert len(batches) == steps and all(b[2] is not None for b in batches)  # unlabeled batches alongside


def test_teacher_update_count_survives_resume(base):
    task = make_task(base, "pl")
    for _ in range(3):
        task.after_step(0)
    state = task.state_dict()
    assert state == {"ema_updates": {"teacher": 3}}
    fresh = make_task(base, "pl")
    fresh.load_state_dict(state)
    assert int(fresh.extras["teacher"].n_averaged) == 3


def test_local_contrastive():
    torch.manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(2, 8, 16, 16), dim=1).requires_grad_(True)
    label = torch.zeros(2, 1, 32, 32)
    label[:, :, 8:24, 8:24] = 1
    loss = local_contrastive(z, label)
    assert loss.shape == (2,) and torch.isfinite(loss).all() and (loss > 0).all()
    loss.sum().backward()
    assert z.grad.abs().sum() > 0
    # one class only: nothing to contrast
    assert torch.allclose(local_contrastive(z.detach(), torch.zeros(2, 1, 32, 32)), torch.zeros(2))
    # embeddings that match their class prototype score lower than random ones
    proto = torch.zeros(2, 8, 16, 16)
    proto[:, 0] = 1
    proto[:, 1, 4:12, 4:12] = 1
    proto[:, 0, 4:12, 4:12] = 0
    assert (local_contrastive(proto, label) < loss.detach()).all()


TOY_METHOD = """
import torch

from qgseg.losses import seg_loss
from qgseg.methods.common import Method, Part, Step, hard


def unlabeled(ctx, x):
    logits = ctx.model(x)
    pl = hard(torch.sigmoid(logits.detach().float()))
    return Step([Part(seg_loss(logits, pl), pl, x)], student=[(x, logits)])


METHOD = Method("toy", "self-training on its own hard prediction (a test's throwaway method)", unlabeled,
                label="Toy", defaults={"ssl.lambda_final": 0.5})
"""


def test_a_new_method_is_one_file_and_one_registry_line(base, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import qgseg.methods
    from qgseg.cli import app
    from qgseg.config import load_config

    (tmp_path / "toy_methods").mkdir()
    (tmp_path / "toy_methods" / "__init__.py").write_text("")
    (tmp_path / "toy_methods" / "toy.py").write_text(TOY_METHOD)  # the one file
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(qgseg.methods.REGISTRY, "toy", "toy_methods.toy")  # the one registry line

    help_text = CliRunner().invoke(app, ["ssl", "--help"], terminal_width=200).output
    assert "toy" in help_text and "qar" in help_text
    loaded = load_config(sets=["ssl.method=toy"], cwd=tmp_path)  # the config check knows it
    assert loaded.config.ssl.method == "toy" and loaded.config.ssl.lambda_final == 0.5  # its default
    assert load_config(sets=["ssl.method=toy", "ssl.lambda_final=0.2"], cwd=tmp_path).config.ssl.lambda_final == 0.2
    assert "toy" in qw_methods() and get_method("toy").label == "Toy"
    task = make_task(base, "toy", qw=True, **{"ssl.lambda_final": 0.25})
    f0 = snapshot(task.model)
    loss, terms = one_step(task)
    assert torch.isfinite(loss) and changed(f0, task.model) and math.isfinite(terms["unsup"])
