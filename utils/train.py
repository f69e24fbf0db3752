"""One client's share of a round: train the sent weights with the stock Ultralytics trainer, hooked by callbacks.

The federation is one training run of `total_epochs` epochs (NUM_ROUNDS x EPOCHS); round r trains epochs
[start_epoch, start_epoch + epochs). Every round builds a fresh trainer with `epochs=total_epochs` and then,
through callbacks only:
- puts the sent model object in place before setup, so training starts from exactly those weights (PITFALLS 1);
- moves the trainer to `start_epoch`, so warmup (counted from iteration 0 of the whole run), the learning-rate
  schedule and `close_mosaic` follow the whole run instead of restarting every round (PITFALLS 3, 6);
- stops after the round's last epoch without any local validation or checkpoint (PITFALLS 2, 5): the global
  model is evaluated once per round instead, and the caller reads the live fp32 weights it trained.
What restarts every round: the optimizer's moment buffers and the trainer's EMA (which is not used: the client
returns the raw trained weights; see README "Training schedule").
"""

import tempfile

from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.utils.torch_utils import unwrap_model

from utils.offline import no_downloads

# Trainer settings that are fixed for federated clients (not user constants).
FIXED = dict(val=False, save=False, plots=False, exist_ok=True, verbose=False, resume=False, patience=0)


def train_round(model, data_yaml, start_epoch, epochs, total_epochs, hyp, callbacks=None):
    """Train `model` in place for one round of the federation's schedule.

    Args:
        model (DetectionModel): the model holding the global weights; trained in place.
        data_yaml (str | Path): the client's resolved data.yaml.
        start_epoch (int): first epoch of this round in the whole run (0-based).
        epochs (int): local epochs this round.
        total_epochs (int): epochs of the whole run (rounds x local epochs).
        hyp (dict): other Ultralytics train arguments (imgsz, batch, device, workers, optimizer, lr0, seed, ...).
        callbacks (dict | None): extra {event: fn} callbacks (tests use them to look inside the trainer).

    Returns:
        (dict): `train_images` (the FedAvg weight), the mean train losses of the round's last epoch and `lr`,
            the learning rate of the weights at the end of the round.
    """
    no_downloads()
    stop_epoch = start_epoch + epochs
    if not 0 <= start_epoch < stop_epoch <= total_epochs:
        raise ValueError(f"round epochs [{start_epoch}, {stop_epoch}) do not fit a run of {total_epochs} epochs")

    def continue_schedule(trainer):
        trainer.start_epoch = start_epoch
        trainer.scheduler.last_epoch = start_epoch - 1  # the epoch loop steps it to start_epoch first

    def end_round(trainer):
        if trainer.epoch == stop_epoch - 1 and stop_epoch == trainer.epochs:
            trainer.epochs += 1  # the run's last epoch: skip the trainer's own final validation and best.pt

    def stop_round(trainer):
        if trainer.epoch >= stop_epoch - 1:
            trainer.stop = True

    with tempfile.TemporaryDirectory(prefix="fedyolo-train-") as work:
        # patience=0 disables early stopping; project=work keeps the trainer's files out of the user's folders
        args = {**hyp, **FIXED, "data": str(data_yaml), "epochs": total_epochs, "project": work, "name": "train"}
        args["model"] = "federated.yaml"  # a label only: the model object is set below
        trainer = DetectionTrainer(overrides=args)
        trainer.model = model
        trainer.add_callback("on_pretrain_routine_end", continue_schedule)
        trainer.add_callback("on_train_epoch_end", end_round)
        trainer.add_callback("on_fit_epoch_end", stop_round)
        for event, fn in (callbacks or {}).items():
            trainer.add_callback(event, fn)
        trainer.train()
        if unwrap_model(trainer.model) is not model:
            raise RuntimeError("the Ultralytics trainer replaced the model object; its weights cannot be returned")
        losses = {k: float(v) for k, v in (trainer.tloss or {}).items()}
        lr = float(trainer.optimizer.param_groups[0]["lr"])  # the weights' learning rate at the end of the round
        return {"train_images": len(trainer.train_loader.dataset), **losses, "lr": lr}
