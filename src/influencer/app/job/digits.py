"""The built-in job: :class:`influencer.models.SmallCNN` trained on scikit-learn's bundled 8x8 digit
images (no download), its head then fitted to the optimum; trained once per settings and kept in the
job cache (:mod:`influencer.app.job.cache`)."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn

from influencer import ClassificationTask, Identity, Influence, Task
from influencer.app.job.job import Job
from influencer.app.run.store import RunStore
from influencer.app.settings.explain import ExplainConfig
from influencer.errors import ConvergenceError
from influencer.extras import require
from influencer.fingerprint import hash_json, hash_tensors
from influencer.heads import Head
from influencer.retraining import AdamRetrainer
from influencer.training import train_lbfgs, train_minibatch

log = logging.getLogger("influencer.explain")

__all__ = ["digits_job", "fit_head"]


def digits_job(config: ExplainConfig, cache: RunStore, device: torch.device) -> Job:
    """SmallCNN on the 8x8 digits, trained once and kept in the job cache ``cache`` (shared by every
    command and run directory), under a fingerprint of its data and training settings.

    Training: Adam for ``config.digits("epochs")`` epochs on ``mean cross-entropy + weight_decay/2 ||w||^2``,
    then the linear head alone is fitted to the exact optimum of that objective with L-BFGS in
    float64 (features fixed). The objective is convex in the head, so the head is then the
    minimiser influence functions assume, and influence over the head (the default ``params``)
    predicts what refitting it without a training image would do, as in Koh & Liang's
    Inception experiments.
    """
    from influencer.datasets import load_digits
    from influencer.models import SmallCNN

    require("sklearn", "the built-in digits job (its images come with scikit-learn)", "data")
    split = load_digits(images=True, seed=0)
    epochs, weight_decay, size = config.digits("epochs"), config.digits("weight_decay"), config.train_size
    n = len(split.x_train) if size is None else min(size, len(split.x_train))
    train = (split.x_train[:n], split.y_train[:n])
    test = split.test
    task = ClassificationTask(weight_decay=config.digits("weight_decay"))
    settings = {
        "model": "SmallCNN",
        "channels": config.digits("channels"),
        "epochs": config.digits("epochs"),
        "lr": config.digits("lr"),
        "batch_size": config.digits("train_batch_size"),
        "weight_decay": config.digits("weight_decay"),
        "seed": config.seed,
        # "recipe": Adam alone, replayable (--method unrolled); else the head is then fitted
        "head": "recipe" if config.method == "unrolled" else "lbfgs-float64",
    }
    # The replayable recipe warms its learning rate up over one epoch: Adam's first steps move every
    # weight by about lr whatever its gradient, so without warmup the run has kinks that even a 0.1%
    # re-weighting crosses (measured: single-model LDS at eps 1e-3 0.85 without, 0.997 with).
    batch = config.digits("train_batch_size")
    warmup = -(-n // batch) if config.method == "unrolled" else 0
    if warmup:
        settings["warmup"] = warmup
    components = {"training data": hash_tensors(train), "training settings": hash_json(settings)}
    section = cache.section(
        "digits-" + hash_json(components)[:16],
        components,
        {"training": settings, "n_train": n},
    )

    def fresh(seed: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the global RNG
            torch.manual_seed(seed)
            return SmallCNN(num_classes=10, channels=config.digits("channels"))

    model = fresh(config.seed)
    recipe = AdamRetrainer(
        epochs=epochs, lr=config.digits("lr"), batch_size=batch, seed=config.seed, warmup=warmup
    )
    state = {k: section.load(k) for k in model.state_dict()} if len(section) else {}
    if state and all(v is not None for v in state.values()):
        model.double().load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
        log.info("model: loaded the trained SmallCNN from the cache (%s)", section.meta.get("trained", "?"))
    else:
        start = time.perf_counter()
        log.info(
            "model: training SmallCNN on %d digit images (%d epochs of Adam, lr %g%s, weight decay %g) on %s",
            n, epochs, config.digits("lr"), f" warmed up over {warmup} steps" if warmup else "", weight_decay,
            device,
        )  # fmt: skip
        if config.method == "unrolled":  # the recipe itself, replayable step by step
            model.double()
            inf = Influence(model, task, train, estimator=Identity(), device=device, progress=False)
            theta = recipe.refit(inf, None, inf.theta)
            inf.fn.load_into(theta)
            history = [float(inf.losses(theta=theta).mean())]
        else:
            history = train_minibatch(
                model, task, train, epochs=epochs, lr=config.digits("lr"),
                batch_size=config.digits("train_batch_size"), seed=config.seed, device=device,
                progress=config.progress,
            )  # fmt: skip
            model.double()
            fit_head(model, task, train, device)
        elapsed = time.perf_counter() - start
        for k, v in model.state_dict().items():
            section.save(k, v)
        section.set_meta(trained=f"{elapsed:.1f} s, final epoch loss {history[-1]:.4f}", epoch_losses=history)
        log.info("model: trained in %.1f s (final epoch loss %.4f)", elapsed, history[-1])
    model.to(device).eval()
    n_params = sum(p.numel() for p in model.parameters())
    trained = (
        f"trained {epochs} epochs with Adam, its learning rate warmed up over the first epoch (the "
        "replayable recipe of --method unrolled)"
        if config.method == "unrolled"
        else f"trained {epochs} epochs with Adam, then its linear head fitted to the optimum of mean "
        f"cross-entropy + {weight_decay:g}/2 ||w||^2 with L-BFGS (float64)"
    )
    about = f"{n} training and {len(test[0])} test images (8x8). SmallCNN ({n_params} parameters) {trained}."
    return Job(
        task=task,
        model=model,
        train=train,
        test=test,
        name="SmallCNN on scikit-learn digits",
        classes=list(split.classes),
        invert_images=True,
        description=about,
        # Influence over the head (the default) needs only its inputs, the network's features:
        # computed once, they make every gradient and Hessian-vector product a linear-layer
        # operation instead of a pass through the convolutions, with the same scores.
        head=None if config.method == "unrolled" else "head",
        retrain=recipe if config.method == "unrolled" else None,
        start=fresh(config.seed).double() if config.method == "unrolled" else None,
    )


def fit_head(model: nn.Module, task: Task, train: Any, device: torch.device, head: str = "head") -> None:
    """Fit the module ``head`` of ``model`` to the optimum of the task's objective with the
    features (the head's inputs) fixed, in place.

    For a linear head and cross-entropy plus L2 the objective is convex in the head. The features
    are computed once (:class:`~influencer.heads.Head`), so L-BFGS works on the head alone with
    the same optimum (the other layers' weight decay is constant in the head): each of its few
    hundred steps on this ill-conditioned problem is then a cheap matrix product instead of a
    pass through the network. Computed in float64; ``model`` must already be float64.
    """
    part = Head(model, task, head)
    features = part.features(train, device=device, dtype=torch.float64, batch_size=1024)
    before = torch.cat([p.detach().reshape(-1) for p in part.model.parameters()]).clone()
    try:
        train_lbfgs(part.model, part.task, features, device=device, dtype=torch.float64)
    except ConvergenceError as exc:  # the Adam solution is still a fine model to explain
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(before, part.model.parameters())
        log.warning("model: the head did not reach the optimum (%s); keeping the Adam weights", exc)
        return
    after = torch.cat([p.detach().reshape(-1) for p in part.model.parameters()])
    shift = float((after - before).norm() / before.norm().clamp_min(1e-30))
    log.info("model: head fitted to the optimum (relative change %.2g)", shift)
