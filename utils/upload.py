"""What a client sends back after training: its weights, or its change since the weights it received, encoded for the
round's transfer (FP16 uplink, DP clipping under SecAgg+, SecAgg+'s own encoding)."""

from utils import secure
from utils.params import encode_update
from utils.privacy import clip_change


def encode_upload(weights, received, config, trainable, out):
    """Return the arrays a client uploads from its trained `weights` and the `received` ones, as the round's config
    asks; the metrics `out` get what the encoding did (`dp_clipped`, `secagg_clipped`; under DP with SecAgg+ every
    client weighs 1, so its `train_images` becomes 1).

    Args:
        weights (list[np.ndarray]): the trained arrays (under SHARE: the shared entries).
        received (list[np.ndarray]): the arrays the client was sent, in the same entries.
        config (dict): the round's config from the server (`fp16`, `secagg`, `dp-clip`, `secagg-weight`, ...).
        trainable (list[bool]): which entries are trainable weights (SecAgg+ scales the BatchNorm statistics).
        out (dict): the client's metrics, updated in place.
    """
    if config["fp16"] in ("up", "both"):  # the change since the received weights, as float16
        weights = encode_update(weights, received)
    if config.get("secagg") and config.get("dp-clip"):  # DP under SecAgg+: each client clips its own change
        weights, norm = clip_change(weights, received, config["dp-clip"])  # and weighs the same in the mean
        out["dp_clipped"], out["train_images"] = int(norm > config["dp-clip"]), 1
    if config.get("secagg"):  # the change since the received weights, for SecAgg+ (utils/secure.py)
        weights = secure.encode(weights, received, trainable)
        out["secagg_clipped"] = secure.clipped_entries(weights, out["train_images"], config["secagg-weight"],
                                                       config["secagg-clip"])
    return weights
