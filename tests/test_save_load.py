"""Saving a fitted Influence and loading it elsewhere: the same scores bit for bit, safetensors and JSON
on disk (no pickle), and a load for other inputs refused with what changed."""

from __future__ import annotations

import copy
import json
import struct

import pytest
import torch

from influencer import CG, EKFAC, KFAC, Arnoldi, Exact, Influence, LiSSA
from influencer.errors import ConfigError, DataError

pytestmark = pytest.mark.usefixtures("one_thread")

FITTED = {
    "exact": Exact(damping=0.1),
    "kfac": KFAC(damping=0.1),
    "ekfac": EKFAC(damping=0.1, relative_damping=0.1),
    "arnoldi": Arnoldi(damping=0.1, rank=20, iterations=40),
    "cg_kfac": CG(damping=0.1, preconditioner=KFAC(damping=0.1)),
}


@pytest.fixture()
def mlp(mlp_small, digits_small):
    model, task = mlp_small
    return model, task, digits_small.train, (digits_small.x_test[:4], digits_small.y_test[:4])


def tensor_names(path) -> list[str]:
    """The tensors in a safetensors file, read from its header (8-byte length, then JSON)."""
    data = (path / "solver.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return sorted(k for k in json.loads(data[8 : 8 + length]) if k != "__metadata__")


@pytest.mark.filterwarnings("ignore:Arnoldi with rank 20 does not capture")
@pytest.mark.parametrize("name", list(FITTED))
def test_round_trip_gives_the_same_scores_bit_for_bit(mlp, tmp_path, name):
    model, task, train, test = mlp
    kwargs = {"estimator": FITTED[name], "curvature": "gauss_newton"}
    inf = Influence(model, task, train, **kwargs).fit()
    scores = inf.scores(test)
    inf.save(tmp_path / "fit")
    assert sorted(p.name for p in (tmp_path / "fit").iterdir()) == ["manifest.json", "solver.safetensors"]
    assert tensor_names(tmp_path / "fit") == sorted(inf.solver.state_dict())
    manifest = json.loads((tmp_path / "fit" / "manifest.json").read_text())
    assert manifest["settings"] == json.loads(json.dumps(inf.settings()))
    loaded = Influence.load(tmp_path / "fit", model, task, train, **kwargs)
    assert torch.equal(loaded.scores(test), scores)
    assert torch.equal(loaded.self_influence(torch.arange(5)), inf.self_influence(torch.arange(5)))


def test_iterative_solvers_store_only_what_they_fitted(mlp, tmp_path):
    model, task, train, test = mlp
    cg = Influence(model, task, train, estimator=CG(damping=0.1), curvature="gauss_newton").fit()
    cg.save(tmp_path / "cg")
    assert tensor_names(tmp_path / "cg") == []  # CG iterates at every solve: settings only
    again = Influence(model, task, train, estimator=CG(damping=0.1), curvature="gauss_newton")
    assert torch.equal(again.load_fitted(tmp_path / "cg").scores(test), cg.scores(test))
    lissa = LiSSA(damping=0.1, depth=100, tol=10.0)  # its scale comes from a power iteration
    inf = Influence(model, task, train, estimator=lissa, curvature="gauss_newton").fit()
    inf.save(tmp_path / "lissa")
    assert tensor_names(tmp_path / "lissa") == ["scale"]
    loaded = Influence.load(tmp_path / "lissa", model, task, train, estimator=lissa, curvature="gauss_newton")
    assert loaded.solver.scale == inf.solver.scale
    assert torch.equal(loaded.scores(test), inf.scores(test))


def test_the_default_choice_round_trips_with_the_damping_it_found(mlp, tmp_path):
    model, task, train, test = mlp
    # Exact on the Hessian asked for: damped from the spectrum of the MLP's indefinite Hessian
    inf = Influence(model, task, train, curvature="hessian").fit()
    inf.save(tmp_path / "fit")
    loaded = Influence.load(tmp_path / "fit", model, task, train, curvature="hessian")
    assert loaded.solver.info["damping"] == inf.solver.info["damping"] > 0
    assert torch.equal(loaded.scores(test), inf.scores(test))


def test_a_load_for_other_inputs_is_refused_with_what_changed(mlp, tmp_path):
    model, task, train, _ = mlp
    kwargs = {"estimator": EKFAC(damping=0.1), "curvature": "gauss_newton"}
    Influence(model, task, train, **kwargs).fit().save(tmp_path)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        moved[0].weight[0, 0] += 1e-6
    with pytest.raises(
        ConfigError, match=r"for other inputs: the model's weights changed \(gradients.model.state\)"
    ):
        Influence.load(tmp_path, moved, task, train, **kwargs)
    x, y = train
    with pytest.raises(ConfigError, match=r"the training data changed \(gradients.train\)"):
        Influence.load(tmp_path, model, task, (x, (y + 1) % 10), **kwargs)
    with pytest.raises(ConfigError, match=r"the parameters chosen \(params\) changed"):
        Influence.load(tmp_path, model, task, train, params=["2"], **kwargs)
    with pytest.raises(
        ConfigError, match=r"the estimator changed \(curvature.estimator.damping 0.1 -> 0.2\)"
    ):
        Influence.load(tmp_path, model, task, train, estimator=EKFAC(damping=0.2), curvature="gauss_newton")
    with pytest.raises(
        ConfigError, match=r"the estimator changed \(curvature.estimator.estimator \"ekfac\" -> \"kfac\"\)"
    ):
        Influence.load(tmp_path, model, task, train, estimator=KFAC(damping=0.1), curvature="gauss_newton")
    with pytest.raises(ConfigError, match=r"the curvature kind changed"):
        Influence.load(tmp_path, model, task, train, estimator=EKFAC(damping=0.1))
    with pytest.raises(ConfigError, match="the task changed"):
        Influence.load(tmp_path, model, type(task)(weight_decay=0.5), train, **kwargs)


def test_missing_unfitted_and_damaged_saves_are_clear_errors(mlp, tmp_path):
    model, task, train, _ = mlp
    kwargs = {"estimator": Exact(damping=0.1), "curvature": "gauss_newton"}
    with pytest.raises(ConfigError, match=r"no saved fit at .*nothing \(manifest\.json is missing\)"):
        Influence.load(tmp_path / "nothing", model, task, train, **kwargs)
    with pytest.raises(ConfigError, match=r"call fit\(\) before"):
        Influence(model, task, train, **kwargs).save(tmp_path / "unfitted")
    Influence(model, task, train, **kwargs).fit().save(tmp_path / "fit")
    tensors = tmp_path / "fit" / "solver.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 1
    tensors.write_bytes(bytes(data))
    with pytest.raises(DataError, match="does not match its manifest"):
        Influence.load(tmp_path / "fit", model, task, train, **kwargs)
    (tmp_path / "fit" / "manifest.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"manifest\.json is not a saved fit"):
        Influence.load(tmp_path / "fit", model, task, train, **kwargs)
