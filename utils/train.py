"""One client's share of a round: train the sent weights with the task's stock Ultralytics trainer (DetectionTrainer,
SegmentationTrainer, PoseTrainer, OBBTrainer, ClassificationTrainer), hooked by callbacks.

The federation is one training run of `total_epochs` epochs (NUM_ROUNDS x EPOCHS); round r trains epochs
[start_epoch, start_epoch + epochs). Every round builds a fresh trainer with `epochs=total_epochs` and then,
through callbacks only:
- puts the sent model object in place before setup, so training starts from exactly those weights (a trainer
  given a model name rebuilds it: a YAML model would restart from a random init);
- moves the trainer to `start_epoch`, so warmup (counted from iteration 0 of the whole run), the learning-rate
  schedule and `close_mosaic` follow the whole run instead of restarting every round (each `train()` call would
  otherwise restart warmup, optimizer and learning-rate decay, and close mosaic for any run of 10 epochs or less);
- stops after the round's last epoch without any local validation or checkpoint (`train()` would validate twice
  and hand back the best epoch's fp16 EMA copy instead of the weights it ended with): the global
  model is evaluated once per round instead, and the caller reads the live fp32 weights it trained.
What restarts every round: the optimizer, unless the client loads its own last state into it (KEEP_OPTIMIZER, the
default; `optimizer_state`). The trainer's EMA is never used (the client returns the raw trained weights; see
docs/training-schedule.md), so it copies nothing: an empty module stands in for its copy.

Two optional changes to the loss, both made on the model's own criterion before the first batch:
- `proximal_mu` (FedProx): the loss gains mu/2 * ||w - w_global||^2 over the trainable weights, w_global being the
  weights the round started from. Ultralytics' loss is the per-image mean times the batch size, so the term is
  scaled by the batch size too: per image, the objective is the paper's F_k(w) + mu/2 ||w - w_global||^2.
  (Classification's loss is the batch mean: there the term is added once.)
- `classes` (partial labels): the global class ids this client annotates. The classification BCE of every other
  class is multiplied by 0 (Ultralytics' own `class_weights` hook in v8DetectionLoss, which the segment, pose and
  obb losses inherit), so a class the client does not label is never taught as background; box and DFL losses are
  unchanged. Classification has no background: a client's images of its classes are true negatives of the others.
"""

import tempfile
import time
from logging import INFO

import torch
from ultralytics.nn.tasks import guess_model_task
from ultralytics.utils.torch_utils import unwrap_model

from utils.console import log
from utils.datasets import client_name
from utils.offline import no_downloads
from utils.tasks import get_task

# Trainer settings that are fixed for federated clients (not user constants).
FIXED = dict(val=False, save=False, plots=False, exist_ok=True, verbose=False, resume=False, patience=0)


class ProximalLoss:
    """Wrap a criterion: add mu/2 * ||w - w0||^2 (times the batch size, for losses summed over it) to its loss."""

    def __init__(self, criterion, model, mu):
        """Keep the criterion and a copy of the model's trainable weights as they are now (the global weights)."""
        self.criterion, self.mu = criterion, mu
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.start = [p.detach().clone() for p in self.params]

    def term(self):
        """Return mu/2 * ||w - w0||^2 over the trainable weights."""
        return 0.5 * self.mu * sum(((p - p0) ** 2).sum() for p, p0 in zip(self.params, self.start))

    def __call__(self, preds, batch):
        """Return the criterion's (loss, items) with the proximal term added to the loss (items unchanged)."""
        loss, items = self.criterion(preds, batch)
        if loss.dim() == 0:  # classification: the batch mean
            return loss + self.term().to(loss.dtype), items
        return torch.cat([loss, (self.term() * batch["img"].shape[0]).view(1).to(loss.dtype)]), items

    def __getattr__(self, name):
        """Forward everything else (update, loss_names, ...) to the wrapped criterion."""
        if "criterion" not in self.__dict__:  # copy/pickle look up attributes before __init__ ran
            raise AttributeError(name)
        return getattr(self.__dict__["criterion"], name)


def get_optimizer_state(optimizer, copy=True):
    """Return (state keys, arrays): the optimizer's per-weight state (Adam moments, step) in parameter order; with
    copy=False, where the state is on the CPU, views of the optimizer's own tensors (for an optimizer that takes no
    more steps: yolov8n's 24 MB of AdamW moments read in 3-4 ms instead of 5-19 ms, on one thread)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    keys = sorted({k for p in params for k in optimizer.state[p]})  # all weights' keys (MuSGD's groups differ)
    # a weight without some key (frozen, or another group's buffer): zeros, step 0
    tensors = [torch.as_tensor(optimizer.state[p].get(k, 0.0 if k == "step" else torch.zeros_like(p))).detach()
               for p in params for k in keys]
    # .cpu() of a CUDA tensor is already a copy; a CPU tensor's numpy() shares the optimizer's memory
    return keys, [t.cpu().numpy().copy() if copy and t.device.type == "cpu" else t.cpu().numpy() for t in tensors]


def fuse_adam(optimizer):
    """Make an Adam or AdamW optimizer take torch's fused step (one kernel over all weights) where its weights are on
    the CPU; Ultralytics asks for it on CUDA only. The same update, computed in another order: equal to float rounding
    (1e-7 relative), not bit for bit. yolov8n's step: 12 ms -> 3 ms on one core, a third of a small-batch client's
    training (bench/round_time.md). Other optimizers (SGD, MuSGD) are left as they are."""
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return
    for group in optimizer.param_groups:
        if not group.get("fused") and all(p.device.type == "cpu" for p in group["params"]):
            group.update(fused=True, foreach=False)


def set_optimizer_state(optimizer, keys, arrays):
    """Load state saved by get_optimizer_state into a fresh optimizer of the same model; False if it does not fit."""
    params = [(p, g) for g in optimizer.param_groups for p in g["params"]]
    if not keys or len(arrays) != len(params) * len(keys):
        return False
    states = []
    for i, (p, g) in enumerate(params):
        # a copy, where torch keeps it: the step count on the CPU unless the optimizer is fused (Ultralytics' Adam and
        # AdamW on CUDA) or capturable
        step_device = p.device if g.get("fused") or g.get("capturable") else "cpu"
        states.append({k: torch.tensor(arrays[i * len(keys) + j], device=step_device if k == "step" else p.device)
                       for j, k in enumerate(keys)})
        if any(v.shape != p.shape for k, v in states[-1].items() if k != "step"):
            return False  # nothing loaded: the optimizer stays fresh
    for (p, _), state in zip(params, states):
        optimizer.state[p] = state
    return True


def set_loss(model, proximal_mu=0.0, classes=None):
    """Give `model` a fresh criterion with the FedProx term and/or the partial-label class mask (see module doc)."""
    if classes is not None:
        nc = len(model.names)
        mask = torch.zeros(nc, device=next(model.parameters()).device)
        mask[list(classes)] = 1.0
        old = getattr(model, "class_weights", None)
        model.class_weights = mask if old is None else old * mask
    model.criterion = model.init_criterion()
    if proximal_mu:
        model.criterion = ProximalLoss(model.criterion, model, proximal_mu)


def client_batch(batch, nbs, images, min_steps):
    """Return this client's {batch, nbs}: both halved together (to 2 at least) until one epoch over its `images`
    makes at least `min_steps` optimizer steps (one step per max(batch, nbs) images); unchanged when min_steps is 0.

    A federation with many small clients otherwise takes a handful of steps per client and round, and averaging K
    such short walks barely moves the model (8 clients of 24-32 images at batch 8: 3-4 steps per epoch).
    """
    while min_steps and max(batch, nbs) > 2 and images / max(batch, nbs) < min_steps:
        batch, nbs = max(batch // 2, 2), max(nbs // 2, 2)
    return {"batch": batch, "nbs": nbs}


def recalibrate_bn(model, trainer):
    """Set every BatchNorm's running mean and variance of `model` to its statistics on one more pass over the trainer's
    train batches (torch's own `update_bn`: training mode, no gradients, the batches' statistics averaged with equal
    weight), under the weights it now holds; BatchNorm's step counts stay as training left them.

    During a round the running statistics move only 3% a step (Ultralytics' BatchNorm momentum) towards the batch
    statistics of weights that change faster than that at the peak learning rate, and a client takes a handful of
    steps: the statistics it sends lag its weights, and so do those of the average (bench/learning.md).
    """
    counts = [(m, m.num_batches_tracked.clone()) for m in model.modules()
              if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.num_batches_tracked is not None]
    if not counts:
        return
    torch.optim.swa_utils.update_bn((trainer.preprocess_batch(b)["img"] for b in trainer.train_loader), model)
    for m, n in counts:
        m.num_batches_tracked.copy_(n)


def fix_bn(trainer):
    """Have every epoch of `trainer` train its model with BatchNorm in eval mode: each layer normalizes by the running
    statistics the model holds (the global model's) and leaves them unchanged; its weight and bias still learn.

    FixBN (Zhong et al., 2023, "Making Batch Normalization Great in Federated Deep Learning"): a small client's batch
    statistics (batch 2 under MIN_STEPS: 8 numbers per channel at the deepest layer at 64 px) are noisy and its own
    kind of images only, so each client trains a different normalization than the one the average is scored with.
    """
    train_mode = trainer._model_train  # the trainer's own: model.train(), then its frozen layers' BatchNorm eval()

    def fixed():
        train_mode()
        for m in trainer.model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
    trainer._model_train = fixed


def train_round(model, data_yaml, start_epoch, epochs, total_epochs, hyp, callbacks=None, proximal_mu=0.0,
                classes=None, optimizer_state=None, label=None, return_state=True, recalibrate=False, fused=False,
                fixed_bn=False):
    """Train `model` in place for one round of the federation's schedule.

    Args:
        model (DetectionModel | SegmentationModel | ...): the model holding the global weights (and the federation's
            class names); trained in place by its task's trainer.
        data_yaml (str | Path): the client's resolved data.yaml (classify: its dataset folder).
        start_epoch (int): first epoch of this round in the whole run (0-based).
        epochs (int): local epochs this round.
        total_epochs (int): epochs of the whole run (rounds x local epochs).
        hyp (dict): other Ultralytics train arguments (imgsz, batch, device, workers, optimizer, lr0, seed, ...).
        callbacks (dict | None): extra {event: fn} callbacks (tests use them to look inside the trainer).
        proximal_mu (float): FedProx's mu; 0 trains on the plain YOLO loss.
        classes (list[int] | None): the classes this client annotates (partial labels); None: all of them.
        optimizer_state (tuple | None): (keys, arrays) of this client's optimizer at the end of its last round, to
            continue with (Adam moments); None: a fresh optimizer.
        label (str | None): the client's name; with it, one progress line per local epoch is logged.
        return_state (bool): copy the optimizer's state out for the next round (about twice the model's size);
            False when the client does not keep it.
        recalibrate (bool): after the epochs, set the BatchNorm statistics from one pass over the train batches
            (`recalibrate_bn`; BN_RECALIBRATE).
        fused (bool): Adam and AdamW take torch's fused step (`fuse_adam`; FUSED_ADAM).
        fixed_bn (bool): BatchNorm normalizes by the running statistics the model holds, not by each batch's
            (`fix_bn`; FIXED_BN).

    Returns:
        (dict): `train_images` (the FedAvg weight), the mean train losses of the round's last epoch, `lr` (the
            learning rate of the weights at the end of the round), `steps` (optimizer steps taken), seconds spent:
            `time_setup` (trainer, dataset scan, dataloaders), `time_train` (the epochs) and with `recalibrate`
            `time_recalibrate`,
            `optimizer_state` (keys, arrays) to pass to the next round (empty lists without `return_state`),
            `optimizer_kept` (1 if `optimizer_state` was loaded) and on CUDA `gpu_mem` (peak MB).
    """
    no_downloads()
    t0, marks = time.time(), {}
    stop_epoch = start_epoch + epochs
    if not 0 <= start_epoch < stop_epoch <= total_epochs:
        raise ValueError(f"round epochs [{start_epoch}, {stop_epoch}) do not fit a run of {total_epochs} epochs")

    def continue_schedule(trainer):
        model.__dict__.pop("__deepcopy__", None)  # the EMA is built: the model copies as usual again
        trainer.start_epoch = start_epoch
        trainer.scheduler.last_epoch = start_epoch - 1  # the epoch loop steps it to start_epoch first
        if proximal_mu or classes is not None:
            set_loss(unwrap_model(trainer.model), proximal_mu, classes)
        if fused:
            fuse_adam(trainer.optimizer)
        marks["kept"] = bool(optimizer_state) and set_optimizer_state(trainer.optimizer, *optimizer_state)
        marks["setup"] = time.time()

    def end_round(trainer):
        if trainer.epoch == stop_epoch - 1 and stop_epoch == trainer.epochs:
            trainer.epochs += 1  # the run's last epoch: skip the trainer's own final validation and best.pt

    def progress(trainer):
        seconds = max(time.time() - trainer.epoch_time_start, 1e-9)
        loss = sum(float(v) for v in (trainer.tloss or {}).values())
        log(INFO, "%s  round %d/%d  epoch %d/%d  loss %.3f  %.0f img/s", client_name(label),
            start_epoch // epochs + 1, total_epochs // epochs, trainer.epoch - start_epoch + 1, epochs, loss,
            len(trainer.train_loader.dataset) / seconds)

    def stop_round(trainer):
        if trainer.epoch >= stop_epoch - 1:
            trainer.stop = True

    with tempfile.TemporaryDirectory(prefix="fedyolo-train-") as work:
        # patience=0 disables early stopping; project=work keeps the trainer's files out of the user's folders
        args = {**hyp, **FIXED, "data": str(data_yaml), "epochs": total_epochs, "project": work, "name": "train"}
        args["model"] = "federated.yaml"  # a label only: the model object is set below
        task = get_task(guess_model_task(model))
        trainer = task.load("trainer")(overrides={**args, "task": task.name})
        trainer.data.update(names=dict(model.names), nc=len(model.names))  # classify: folders matched by name
        trainer.model = model
        if fixed_bn:
            fix_bn(trainer)
        if str(hyp.get("device", "")).lower() == "cpu":  # its end-of-training gc.collect() frees no accelerator memory
            trainer._clear_memory = lambda threshold=None: None  # on a CPU; it took 0.2 s of a tiny client's 0.5 s
        set_class_weights = trainer.set_class_weights

        def no_ema_copy():  # the trainer builds its EMA right after this: a full copy of the model, updated every
            set_class_weights()  # step, that a client never uses (it returns the weights it trained); it holds an
            model.__deepcopy__ = lambda memo: torch.nn.Module()  # empty module instead (0.08 s of a 0.8 s round)
        trainer.set_class_weights = no_ema_copy
        warm = float(hyp.get("warmup_epochs", 0))  # the server's resolved warmup, not capped to the run's length
        trainer._get_warmup_iterations = lambda nb: round(warm * nb) if warm > 0 else 0
        trainer.add_callback("on_pretrain_routine_end", continue_schedule)
        trainer.add_callback("on_train_epoch_end", end_round)
        if label:
            trainer.add_callback("on_train_epoch_end", progress)
        trainer.add_callback("on_fit_epoch_end", stop_round)
        for event, fn in (callbacks or {}).items():
            trainer.add_callback(event, fn)
        optimizer_step, marks["steps"] = trainer.optimizer_step, 0

        def counted_step():  # the optimizer steps of this round: fednova's normalization (utils/strategies.py)
            marks["steps"] += 1
            optimizer_step()
        trainer.optimizer_step = counted_step
        try:
            trainer.train()
        finally:
            model.__dict__.pop("__deepcopy__", None)
        if unwrap_model(trainer.model) is not model:
            raise RuntimeError("the Ultralytics trainer replaced the model object; its weights cannot be returned")
        t1 = time.time()
        if recalibrate:
            recalibrate_bn(model, trainer)
        losses = {k: float(v) for k, v in (trainer.tloss or {}).items()}
        lr = float(trainer.optimizer.param_groups[0]["lr"])  # the weights' learning rate at the end of the round
        if trainer.device.type == "cuda":  # peak GPU memory of this client process, MB (bench/gpu_check.sh)
            losses["gpu_mem"] = torch.cuda.max_memory_reserved(trainer.device) / 2**20
        return {"train_images": len(trainer.train_loader.dataset), **losses, "lr": lr, "batch": trainer.batch_size,
                "steps": marks["steps"], "time_setup": marks["setup"] - t0, "time_train": t1 - marks["setup"],
                **({"time_recalibrate": time.time() - t1} if recalibrate else {}),
                "optimizer_state": get_optimizer_state(trainer.optimizer, copy=False) if return_state else ([], []),
                "optimizer_kept": int(marks["kept"])}
