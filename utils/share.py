"""Partial sharing (SHARE): which parts of the model the clients average, and which stay with each client.

A YOLO architecture has three parts, read from its own .yaml: the `backbone` (the layers its `backbone:` list
builds), the `head` (the last layer: Detect, Segment, Pose, OBB or Classify) and the `neck` (the layers between;
a classify model has none). SHARE is `all` or parts joined by `+` (`backbone`, `backbone+neck`, `neck+head`, ...).
The state_dict entries of the other parts never travel from a client to the server, nor back after round 1: each
client keeps them in its Flower Context state (as FEDBN keeps BatchNorm), and in its personalized model file.
The server's global model (round npz, best.pt, last.pt) holds the shared parts averaged and the others as the run
started (the base model's, or its seeded random init).
"""

import re

from utils.model import build_model

PARTS = ("backbone", "neck", "head")


def part(key, arch):
    """Return the part ("backbone", "neck" or "head") of state_dict entry `key` (model.<layer>.) of architecture
    `arch`."""
    layer = int(re.match(r"model\.(\d+)\.", key).group(1))
    if layer < len(arch["backbone"]):
        return "backbone"
    return "head" if layer == len(arch["backbone"]) + len(arch["head"]) - 1 else "neck"


def parse(share):
    """Return the set of shared parts of a SHARE value; ValueError naming the setting when it is not one."""
    parts = {p.strip().lower() for p in str(share).split("+")}
    if parts == {"all"}:
        return set(PARTS)
    if not parts or not parts <= set(PARTS):
        raise ValueError(f"share must be all or parts joined by + among {', '.join(PARTS)} (got {share!r})")
    return parts


def shared_entries(keys, arch, share):
    """Return the indices of the state_dict `keys` that SHARE shares, or None when it shares everything."""
    parts = parse(share)
    if parts == set(PARTS):
        return None
    return [i for i, k in enumerate(keys) if part(k, arch) in parts]


def own_entries(n, shared):
    """Return the indices, among `n` state_dict entries, that stay with each client (those not in `shared`)."""
    return sorted(set(range(n)) - set(shared))


def check_share(cfg, arch, keys):
    """Return None if SHARE fits the run's model and other settings, else one sentence naming the conflict."""
    try:
        parts = parse(cfg["SHARE"])
    except ValueError as e:
        return str(e)
    if parts == set(PARTS):
        return None
    have = {part(k, arch) for k in keys}
    empty = sorted(parts - have)
    if empty:
        return f"share {cfg['SHARE']!r}: this model has no {' or '.join(empty)} (it has {', '.join(sorted(have))})"
    if cfg["SECAGG"]:
        return f"share {cfg['SHARE']!r} cannot be combined with secagg (its masked vectors hold every entry)"
    return None


def check_fit(arch, state, client_arch, client_state, share, base, name):
    """Return None if a client model `name` (architecture, state_dict) holds the shared parts of the run's model `base`
    (the same entries, names and shapes), so that clients of different tasks can average them; else one sentence
    naming the first misfit."""
    keys, client_keys = list(state), list(client_state)
    mine, theirs = shared_entries(keys, arch, share), shared_entries(client_keys, client_arch, share)
    if mine is None:
        return (f"client model {name} is not the base model {base}: clients of different models keep their own head; "
                "set share to backbone or backbone+neck")
    a = [(keys[i], tuple(state[keys[i]].shape)) for i in mine]
    b = [(client_keys[i], tuple(client_state[client_keys[i]].shape)) for i in theirs]
    for (ka, sa), (kb, sb) in zip(a, b):
        if (ka, sa) != (kb, sb):
            return (f"client model {name} does not fit the shared parts ({share}) of {base}: entry {ka} {list(sa)} "
                    f"there, {kb} {list(sb)} in {name}")
    if len(a) != len(b):
        return f"client model {name} has {len(b)} shared entries ({share}), {base} has {len(a)}"
    return None


def check_client_models(cfg, arch, state, own, names):
    """Return None if every client model of a federation of mixed tasks (`own`: their (architecture, weights), in
    CLIENT_MODELS' order) holds SHARE's parts of the run's model (`arch`, its `state`), else one sentence."""
    for m, (a, _) in zip(cfg["CLIENT_MODELS"], own):
        problem = check_fit(arch, state, a, build_model(a, names).state_dict(), cfg["SHARE"], cfg["BASE_MODEL"], m)
        if problem:
            return problem
    return None


def expand(shared, idx, fill):
    """Return a full list of arrays: `shared` (the shared entries, in order) at indices `idx`, `fill` elsewhere."""
    full = list(fill)
    for i, a in zip(idx, shared):
        full[i] = a
    return full
