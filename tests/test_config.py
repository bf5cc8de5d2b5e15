"""Settings of `influencer explain`: validation, TOML, JSON round trip, estimator options."""

from __future__ import annotations

import pytest

from influencer import CG, Identity, LiSSA
from influencer.app.settings.estimators import estimator_classes
from influencer.app.settings.explain import ExplainConfig
from influencer.app.settings.values import parse_option
from influencer.errors import ConfigError


def test_defaults_and_json_round_trip():
    config = ExplainConfig(test_ids=[3, 1], params=["head"], estimator="cg", estimator_options={"tol": 1e-6})
    assert config.test_ids == (3, 1) and config.params == ("head",)
    again = ExplainConfig.from_json(config.to_json())
    assert again == config
    assert ExplainConfig().estimator == "auto"  # the library's automatic choice, made per job
    assert ExplainConfig(estimator="cg").make_estimator() == CG()  # damping only when asked for
    assert ExplainConfig(estimator="cg", damping=0.01).make_estimator() == CG(damping=0.01)


def test_frozen():
    with pytest.raises(AttributeError):
        ExplainConfig().damping = 1.0  # type: ignore[misc]


def test_toml_file(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text(
        'estimator = "lissa"\ndamping = 0.01\ntest_ids = [4, 8]\n\n'
        "[estimator_options]\ndepth = 50\nscale = 20.0\n"
    )
    config = ExplainConfig.from_toml(path)
    assert config.make_estimator() == LiSSA(damping=0.01, depth=50, scale=20.0)
    assert config.test_ids == (4, 8)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"dampng": 0.1}, "unknown setting 'dampng' (did you mean 'damping'?)"),
        ({"estimator": "cgg"}, "unknown estimator 'cgg'; choose one of .*cg.* (did you mean 'cg'?)"),
        (
            {"estimator": "cg", "estimator_options": {"tol": 1e-6, "depth": 3}},
            "estimator 'cg' has no option 'depth'",
        ),
        ({"estimator": "cg", "estimator_options": {"tol": -1.0}}, "CG.tol must be a finite number > 0"),
        (
            {"estimator_options": {"tol": 1e-6}},
            "-o tol=... sets an option of a chosen estimator: give --estimator",
        ),
        ({"task": "m:build", "epochs": 3}, "--epochs sets the training of the built-in digits job"),
        ({"damping": -1.0}, "damping must be a finite number >= 0"),
        ({"relative_damping": float("nan")}, "relative_damping must be a finite number >= 0"),
        ({"estimator": "identity", "damping": 0.1}, "damping has no meaning"),
        ({"damping": "0.1"}, "damping must be a float; got '0.1'"),
        ({"epochs": 2.5}, "epochs must be a int"),
        ({"top_k": True}, "top_k must be a int"),
        ({"test_ids": [1, "2"]}, "test_ids must be a list of ints"),
        ({"test_ids": [1, 1]}, "duplicates"),
        ({"test_ids": []}, "test_ids is empty"),
        ({"curvature": "fisher"}, "curvature must be one of hessian, gauss_newton"),
        ({"device": "gpu"}, "device must be 'cpu', 'cuda', 'cuda:N'"),
        ({"task": "no_colon"}, "package.module:function"),
        ({"num_test": 0}, "num_test must be >= 1"),
        ({"train_size": 1}, "train_size must be >= 2"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"dtype": "float16"}, "dtype must be one of float32, float64"),
        ({"hessian_size": 0}, "hessian_size must be >= 1"),
        ({"hessian_sampler": "logits"}, "hessian_sampler must be one of class, feature, logit, random"),
    ],
)
def test_bad_settings_are_refused_with_the_fix(values, message):
    with pytest.raises(
        ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")
    ):
        ExplainConfig.from_dict(values)


def test_identity_defaults_to_zero_damping():
    assert ExplainConfig(estimator="identity").make_estimator() == Identity()


def test_replace_validates_again():
    config = ExplainConfig()
    assert config.replace(top_k=3).top_k == 3
    with pytest.raises(ConfigError, match="top_k must be >= 1"):
        config.replace(top_k=0)
    with pytest.raises(ConfigError, match="unknown setting 'topk'"):
        config.replace(topk=3)


def test_bad_toml_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("damping = = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        ExplainConfig.from_toml(path)
    with pytest.raises(ConfigError, match="does not exist"):
        ExplainConfig.from_toml(tmp_path / "missing.toml")


def test_parse_option():
    assert parse_option("depth=500") == ("depth", 500)
    assert parse_option("scale = 2.5") == ("scale", 2.5)
    assert parse_option("float64=false") == ("float64", False)
    assert parse_option("name=abc") == ("name", "abc")
    with pytest.raises(ConfigError, match="NAME=VALUE"):
        parse_option("depth")


def test_every_estimator_file_is_found():
    names = estimator_classes()
    assert {"cg", "exact", "lissa", "arnoldi", "identity"} <= set(names)
    for cls in names.values():
        cls()  # each is constructible with its defaults
