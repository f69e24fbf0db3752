"""The client's loss changes: FedProx's proximal term and the partial-label class mask, on the real YOLO loss."""

import numpy as np
import torch
from ultralytics.cfg import get_cfg

from tests.conftest import TINY
from tests.test_train import data_yaml  # noqa: F401  (fixture)
from utils.model import build_model
from utils.params import get_weights
from utils.train import ProximalLoss, set_loss, train_round


def _model(tiny_model):
    cfg, names = tiny_model
    model = build_model(cfg, names, seed=0)
    model.args = get_cfg()  # the loss gains the trainer would give it
    return model


def _batch():
    g = torch.Generator().manual_seed(0)
    return {"img": torch.rand(2, 3, 64, 64, generator=g), "batch_idx": torch.tensor([0.0, 1.0]),
            "cls": torch.tensor([[0.0], [0.0]]), "bboxes": torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.3, 0.3, 0.2, 0.2]])}


def _cls_grads(model, **loss):
    """Gradient of the class output layers' weights, one row per class, after one loss backward."""
    set_loss(model, **loss)
    model.zero_grad()
    loss_value, _ = model.loss(_batch())
    loss_value.sum().backward()
    return torch.stack([head[-1].weight.grad.flatten(1).abs().sum(1) for head in model.model[-1].cv3]).sum(0)


def test_class_mask_stops_teaching_unannotated_classes_as_background(tiny_model):
    model = _model(tiny_model)
    plain = _cls_grads(model)
    masked = _cls_grads(model, classes=[0, 1])  # this client annotates circle and square only
    assert (plain > 0).all()  # unrestricted: every class output is pushed (towards background for 2 and 3)
    assert (masked[:2] > 0).all() and (masked[2:] == 0).all()


def test_proximal_term_value(tiny_model):
    model = _model(tiny_model)
    set_loss(model, proximal_mu=0.5)
    assert isinstance(model.criterion, ProximalLoss) and float(model.criterion.term()) == 0.0  # at the global weights
    p = next(q for q in model.parameters() if q.requires_grad)
    with torch.no_grad():
        p.add_(0.1)
    assert np.isclose(float(model.criterion.term()), 0.5 / 2 * 0.01 * p.numel(), rtol=1e-4)
    loss_prox, _ = model.loss(_batch())
    set_loss(model)
    loss_plain, _ = model.loss(_batch())
    assert np.isclose(float(loss_prox.sum() - loss_plain.sum()), 2 * 0.25 * 0.01 * p.numel(), rtol=1e-3)  # x batch 2


def test_proximal_term_changes_the_update(data_yaml, tiny_model):  # noqa: F811
    cfg, names = tiny_model
    start = get_weights(build_model(cfg, names, seed=0))
    moves = {}
    for mu in (0.0, 50.0):
        model = build_model(cfg, names, seed=0)
        out = train_round(model, data_yaml, 0, 2, 2, {**TINY, "nbs": 4}, proximal_mu=mu)  # 4 optimizer steps
        assert np.isfinite(out["box_loss"])
        moves[mu] = sum(float(((a - b) ** 2).sum()) for a, b, k in zip(get_weights(model), start, model.state_dict())
                        if "running" not in k and a.dtype.kind == "f")
    assert moves[50.0] < 0.9 * moves[0.0]  # pulled towards the global weights
