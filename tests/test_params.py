"""Parameter round trip, npz format and the weighted aggregate."""

import numpy as np
import pytest
import torch
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

from utils.aggregate import check_update, weighted_average
from utils.model import build_model
from utils.params import (
    ArraysClient,
    arrays_to_parameters,
    get_weights,
    load_npz,
    parameters_to_arrays,
    save_npz,
    set_weights,
)


def test_round_trip_keeps_dtypes_and_0d_buffers(tiny_model):
    cfg, names = tiny_model
    model = build_model(cfg, names, seed=1)
    arrays = get_weights(model)
    assert len(arrays) == len(model.state_dict()) == 355
    nbt = [a for a in arrays if a.dtype == np.int64]
    assert nbt and all(a.shape == () for a in nbt)
    assert {a.dtype for a in arrays} == {np.dtype(np.float32), np.dtype(np.int64)}

    other = build_model(cfg, names, seed=2)
    set_weights(other, arrays)
    for (k, a), b in zip(other.state_dict().items(), model.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a, b), k


def test_npz_is_positional_and_loads_with_seed_recipe(tiny_model, tmp_path):
    cfg, names = tiny_model
    model = build_model(cfg, names)
    arrays = get_weights(model)
    path = tmp_path / "round1.npz"
    save_npz(path, arrays)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round1.npz"]  # no temp file left
    with np.load(path) as z:
        assert z.files == [f"arr_{i}" for i in range(len(arrays))]
        loaded = [z[k] for k in z.files]
    # a hand-written export recipe, with torch.as_tensor (torch.Tensor turns a 0-d int64 buffer into floats)
    sd = {k: torch.as_tensor(v) for k, v in zip(model.state_dict().keys(), loaded)}
    fresh = build_model(cfg, names, seed=3)
    fresh.load_state_dict(sd, strict=True)
    assert all(np.array_equal(a, b) for a, b in zip(get_weights(fresh), arrays))


def test_load_npz_refuses_truncated_file(tiny_model, tmp_path):
    cfg, names = tiny_model
    path = tmp_path / "round1.npz"
    save_npz(path, get_weights(build_model(cfg, names)))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="round1.npz"):
        load_npz(path)


def test_set_weights_names_first_mismatch(tiny_model):
    cfg, names = tiny_model
    model = build_model(cfg, names)
    arrays = get_weights(build_model(cfg, names + ["extra"]))  # another class count
    with pytest.raises(ValueError, match=r"entry \d+ \(model\.22\.cv3\.0\.2\.weight\) has shape"):
        set_weights(model, arrays)


def _fit_res(arrays, n, metrics=None):
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), n, metrics or {})


def test_weighted_average_with_real_fitres():
    ref = [np.zeros((2, 2), np.float32), np.array(0, np.int64)]
    a = [np.ones((2, 2), np.float32), np.array(10, np.int64)]
    b = [np.full((2, 2), 4.0, np.float32), np.array(20, np.int64)]
    from flwr.common import parameters_to_ndarrays

    results = [_fit_res(a, 30), _fit_res(b, 10)]
    updates = [(parameters_to_ndarrays(r.parameters), r.num_examples) for r in results]
    out = weighted_average(updates, ref)
    np.testing.assert_allclose(out[0], np.full((2, 2), (1 * 30 + 4 * 10) / 40))
    assert out[0].dtype == np.float32
    assert out[1].dtype == np.int64 and out[1].shape == () and int(out[1]) == 12  # round(12.5) to even


def test_check_update_rejects_bad_updates():
    ref = [np.zeros((2, 2), np.float32), np.array(0, np.int64)]
    good = [np.ones((2, 2), np.float32), np.array(1, np.int64)]
    assert check_update(good, ref, 5) is None
    assert "positive" in check_update(good, ref, 0)
    assert "sent 3 arrays" in check_update(good[:1] + good, ref, 5)
    assert "entry 0" in check_update([np.ones((3, 2), np.float32), good[1]], ref, 5)
    assert "NaN" in check_update([np.full((2, 2), np.nan, np.float32), good[1]], ref, 5)
    assert check_update(good, ref, 5, {"box_loss": float("nan")}) == "its box_loss is nan"


class _Proxy:
    """The one ClientProxy attribute the strategy reads."""

    def __init__(self, cid):
        self.cid = cid


def test_strategy_aggregates_real_fitres_saves_npz_and_rejects_bad_update(tmp_path):
    import federated

    ref = [np.zeros((2, 2), np.float32), np.zeros(3, np.float32), np.array(0, np.int64)]
    cfg = {**federated.DEFAULTS, "SAVE_DIR": str(tmp_path), "NUM_ROUNDS": 2, "EVALUATE": True}
    run = {"initial": ref, "spec": {"names": ["a"], "datasets": []}, "trainable": [True, False, False], "offset": 0,
           "rows": [], "train_images": {}, "bn_pairs": []}
    strategy = federated.SaveFedAvg(cfg, run)
    a = [np.ones((2, 2), np.float32), np.full(3, 2.0, np.float32), np.array(4, np.int64)]
    b = [np.full((2, 2), 3.0, np.float32), np.full(3, 6.0, np.float32), np.array(8, np.int64)]
    bad = [np.ones((2, 3), np.float32), *a[1:]]  # another shape: must not be averaged in
    results = [(_Proxy("a"), _fit_res(a, 30)), (_Proxy("b"), _fit_res(b, 10)), (_Proxy("x"), _fit_res(bad, 1000))]

    params, metrics = strategy.aggregate_fit(1, results, [])

    from flwr.common import parameters_to_ndarrays

    out = parameters_to_ndarrays(params)
    saved = load_npz(tmp_path / "round1.npz")
    for x, y, want in zip(out, saved, [np.full((2, 2), 1.5), np.full(3, 3.0), np.array(5)]):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_allclose(x, want)
    assert [x.dtype for x in saved] == [np.float32, np.float32, np.int64] and saved[2].shape == ()


def test_strategy_skips_round_below_min_updates_and_survives_full_disk(tmp_path, monkeypatch):
    import errno

    import federated

    ref = [np.zeros((2, 2), np.float32), np.array(0, np.int64)]
    cfg = {**federated.DEFAULTS, "SAVE_DIR": str(tmp_path), "NUM_ROUNDS": 3, "EVALUATE": True, "MIN_UPDATES": 2}
    run = {"initial": ref, "spec": {"names": ["a"], "datasets": []}, "trainable": [True, False], "offset": 0,
           "rows": [], "train_images": {}, "bn_pairs": []}
    strategy = federated.SaveFedAvg(cfg, run)
    good = [np.ones((2, 2), np.float32), np.array(1, np.int64)]
    nan = [np.full((2, 2), np.nan, np.float32), np.array(1, np.int64)]

    params, _ = strategy.aggregate_fit(1, [(_Proxy("a"), _fit_res(good, 5)), (_Proxy("b"), _fit_res(nan, 5))], [])

    from flwr.common import parameters_to_ndarrays

    kept = parameters_to_ndarrays(params)  # one valid update < min-updates 2: the global model is kept
    assert all(np.array_equal(a, b) for a, b in zip(kept, ref))
    assert all(np.array_equal(a, b) for a, b in zip(load_npz(tmp_path / "round1.npz"), ref))
    assert strategy.record.pending["updates"] == 1

    before = (tmp_path / "round1.npz").read_bytes()

    def full_disk(f, *arrays):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", full_disk)
    with pytest.raises(OSError, match="No space left"):
        strategy.aggregate_fit(2, [(_Proxy("a"), _fit_res(good, 5)), (_Proxy("b"), _fit_res(good, 5))], [])
    assert (tmp_path / "round1.npz").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round1.npz"]  # no partial round2, no temp file
    assert all(np.array_equal(a, b) for a, b in zip(strategy.current, ref))  # nothing half-applied


def test_load_npz_never_unpickles(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, np.array([{"x": 1}], dtype=object))  # an object array is stored as a pickle
    with pytest.raises(ValueError, match="evil.npz cannot be read .*allow_pickle"):
        load_npz(path)
    np.savez(tmp_path / "named.npz", weights=np.zeros(2))
    with pytest.raises(ValueError, match="not named arr_0"):
        load_npz(tmp_path / "named.npz")


def test_strategy_counts_no_client_above_its_datasets_size(tmp_path):
    import federated

    ref = [np.zeros(2, np.float32)]
    cfg = {**federated.DEFAULTS, "SAVE_DIR": str(tmp_path), "NUM_ROUNDS": 1, "EVALUATE": True}
    run = {"initial": ref, "spec": {"names": ["a"], "datasets": []}, "trainable": [True], "offset": 0, "rows": [],
           "train_images": {"/data/a": 10, "/data/b": 10}, "bn_pairs": []}
    strategy = federated.SaveFedAvg(cfg, run)
    liar = _fit_res([np.full(2, 9.0, np.float32)], 10**9, {"dataset": "/data/a", "box_loss": 1.0})
    honest = _fit_res([np.full(2, 1.0, np.float32)], 10, {"dataset": "/data/b", "box_loss": 3.0})

    _, metrics = strategy.aggregate_fit(1, [(_Proxy("a"), liar), (_Proxy("b"), honest)], [])

    np.testing.assert_allclose(load_npz(tmp_path / "round1.npz")[0], [5.0, 5.0])  # 10 and 10 images, not 1e9 and 10
    assert metrics == {"box_loss": 2.0}


def test_an_update_decodes_and_encodes_exactly_as_flower_does_it(tiny_model):
    """The decoder (each .npy header parsed once) returns what flwr's parameters_to_ndarrays returns: every value,
    dtype, shape and layout, for float32, float16, integer, 0-d, empty and Fortran-ordered arrays; the encoder (each
    header written once) writes the bytes flwr's ndarrays_to_parameters writes, strided and big-endian arrays too."""
    from flwr.common import parameters_to_ndarrays

    cfg, names = tiny_model
    arrays = get_weights(build_model(cfg, names))
    arrays += [a.astype(np.float16) for a in arrays[:3]] + [np.array(7, np.int64), np.zeros((0, 3), np.float32),
                                                             np.asfortranarray(np.arange(12.0).reshape(3, 4))]
    params = ndarrays_to_parameters(arrays)
    for more in ([], [arrays[0][:, ::2], np.arange(6, dtype=">f4").reshape(2, 3)]):  # the second time: kept headers
        written = arrays_to_parameters(arrays + more)
        assert written.tensors == ndarrays_to_parameters(arrays + more).tensors
        assert written.tensor_type == params.tensor_type
    for _ in range(2):  # the second time from the parsed headers
        ours, flower = parameters_to_arrays(params), parameters_to_ndarrays(params)
        assert len(ours) == len(flower) == len(arrays)
        for a, b in zip(ours, flower):
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
            assert a.flags.writeable and a.flags.c_contiguous == b.flags.c_contiguous
    with pytest.raises(ValueError, match="not in .npy format"):
        parameters_to_arrays(type(params)(tensors=[b"junk" * 4], tensor_type="numpy.ndarray"))


def test_a_client_answers_exactly_as_flowers_own_numpy_client_wrapper():
    """ArraysClient (federated.py's client_fn) sends the same FitRes and EvaluateRes as NumPyClient.to_client()."""
    from flwr.client import NumPyClient
    from flwr.common import EvaluateIns, FitIns, GetPropertiesIns

    class Doubling(NumPyClient):
        def get_properties(self, config):
            return {"name": f"site {config['n']}"}

        def fit(self, parameters, config):
            return [2 * a for a in parameters], 5, {"seen": float(sum(a.sum() for a in parameters))}

        def evaluate(self, parameters, config):
            return 0.25, 3, {"score": float(parameters[1][0])}

    params = ndarrays_to_parameters([np.arange(4.0, dtype=np.float32), np.array([3, 4], np.int64)])
    ours, flowers = ArraysClient(Doubling()), Doubling().to_client()
    assert ours.get_properties(GetPropertiesIns({"n": 1})) == flowers.get_properties(GetPropertiesIns({"n": 1}))
    assert ours.fit(FitIns(params, {})) == flowers.fit(FitIns(params, {}))
    assert ours.evaluate(EvaluateIns(params, {})) == flowers.evaluate(EvaluateIns(params, {}))
    assert ours.fit(FitIns(params, {})).parameters.tensors[1][-16:] == np.array([6, 8], np.int64).tobytes()
