"""Settings of ``influencer index`` and ``influencer query``: frozen dataclasses, validated on
construction, serialisable like :class:`~influencer.app.settings.explain.ExplainConfig`.

``influencer index`` builds a gradient store for a job (the same jobs ``influencer explain``
explains: the built-in digits CNN or ``--task package.module:function``); :class:`IndexConfig`
holds the job's settings and the projector's. ``influencer query`` reads a store;
:class:`QueryConfig` holds what to ask it. The job a store was built from is recorded in the
store (:data:`JOB_FIELDS`), so a query needs only the store.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from influencer.app.settings.explain import ExplainConfig
from influencer.app.settings.values import (
    BASES,
    DEFAULT_K,
    DEFAULT_K_IN,
    DEFAULT_K_OUT,
    DEFAULT_RELATIVE_DAMPING,
    PRECONDITIONERS,
    PROJECTORS,
    SCORE_DTYPES,
    check_choice,
    check_damping,
    check_positive,
    check_types,
    did_you_mean,
    from_dict,
    to_dict,
)
from influencer.errors import ConfigError

__all__ = [
    "BASES",
    "DEFAULT_K",
    "DEFAULT_K_IN",
    "DEFAULT_K_OUT",
    "DEFAULT_RELATIVE_DAMPING",
    "JOB_FIELDS",
    "PROJECTORS",
    "IndexConfig",
    "QueryConfig",
]

# The fields of ExplainConfig that define the job a store is built from: recorded in the store, and
# used again by `influencer query` and `influencer explain --store` to rebuild the same job.
JOB_FIELDS = (
    "task",
    "params",
    "head",
    "dtype",
    "train_size",
    "epochs",
    "lr",
    "train_batch_size",
    "weight_decay",
    "channels",
    "seed",
)


def check_preconditioner(kind: str | None, relative: float | None, damping: float | None) -> None:
    """Refuse an unknown preconditioner, or a damping that is negative, not finite or meaningless."""
    check_choice("preconditioner", kind, PRECONDITIONERS)
    check_damping("relative_damping", relative)
    check_damping("damping", damping)
    if kind == "none" and (relative is not None or damping is not None):
        raise ConfigError(
            "--preconditioner none uses no curvature: it takes no --damping or --relative-damping"
        )


def products_dtype(name: str | None) -> Any:
    """A store's product dtype by name (one of SCORE_DTYPES) as a torch dtype; None stays None."""
    import torch

    return None if name is None else getattr(torch, name)


@dataclasses.dataclass(frozen=True, kw_only=True)
class IndexConfig:
    """Everything ``influencer index`` does: which job, which projection, where.

    ``projector=None`` chooses: Kronecker ``k_in x k_out`` per layer when every chosen parameter is
    in an ``nn.Linear``/``nn.Conv2d`` layer, else a dense Gaussian projection to ``k`` dimensions
    (the exact gradients when ``p <= k``). Projected gradients are stored in the compute ``dtype``.
    """

    out: str = "runs/index"  # the store directory
    # the job (as for influencer explain)
    task: str | None = None  # "package.module:function"; None = the built-in digits CNN
    params: tuple[str, ...] | None = None  # None: the job's choice
    head: str | None = None  # influence over this module alone, on the network's features
    dtype: str = "float32"
    device: str = "cpu"
    batch_size: int = 256  # examples per gradient batch
    train_size: int | None = None  # digits job: the first N training images
    epochs: int | None = None  # digits job (None: its default)
    lr: float | None = None  # digits job
    weight_decay: float | None = None  # digits job
    # the projection
    projector: str | None = None  # kronecker, gaussian, rademacher, identity; None: chosen (see above)
    k_in: int | None = None  # Kronecker (default 32)
    k_out: int | None = None  # Kronecker (default 32)
    k: int | None = None  # Gaussian, Rademacher (default 1024)
    basis: str | None = None  # Kronecker: "pca" (default; fitted to the training data) or "random"
    seed: int = 0  # of the random projection (PCA basis: of the examples it is estimated on)
    chunk: int = 4096  # training examples per stored file (the unit of resumption)
    # the projected Fisher's products: "bfloat16" (faster, the Fisher to about 3 digits), "float32",
    # "float64"; None: the store's dtype
    fisher_dtype: str | None = None
    # How queries precondition by default (recorded in the store; a query may choose another):
    # "fisher" (the projected Fisher, stored with the gradients), "ekfac" or "none".
    preconditioner: str = "fisher"
    relative_damping: float | None = None  # x the mean eigenvalue; None: DEFAULT_RELATIVE_DAMPING
    damping: float | None = None  # absolute, added to that; None: 0
    cache_dir: str | None = None  # the job cache (see ExplainConfig.cache_dir)
    overwrite: bool = False  # rebuild a store built from other inputs instead of refusing
    progress: bool = True

    def __post_init__(self) -> None:
        if self.params is not None:
            object.__setattr__(self, "params", tuple(self.params))
        check_types(self)
        if not self.out.strip():
            raise ConfigError("out (the store directory) must not be empty")
        check_positive(self, "k_in", "k_out", "k", "chunk", "batch_size")
        check_choice("fisher_dtype", self.fisher_dtype, SCORE_DTYPES)
        if self.projector is not None and self.projector not in PROJECTORS:
            raise ConfigError(
                f"unknown projector {self.projector!r}; choose one of {', '.join(PROJECTORS)}"
                + did_you_mean(self.projector, PROJECTORS)
            )
        kron = self.k_in is not None or self.k_out is not None
        if kron and self.k is not None:
            raise ConfigError(
                "give --k-in/--k-out (a Kronecker projection per layer) or --k (a dense projection), not both"
            )
        if kron and self.projector not in (None, "kronecker"):
            raise ConfigError(
                f"--k-in and --k-out set a Kronecker projection; the {self.projector} projector takes --k"
                if self.projector != "identity"
                else "the identity projector stores exact gradients: it takes no --k-in, --k-out or --k"
            )
        if self.basis is not None and self.basis not in BASES:
            raise ConfigError(
                f"unknown basis {self.basis!r}; choose one of {', '.join(BASES)}"
                + did_you_mean(self.basis, BASES)
            )
        if self.basis is not None and (self.k is not None or self.projector not in (None, "kronecker")):
            raise ConfigError(
                "--basis chooses the Kronecker projection's basis; a dense projection (--k, or "
                f"--projector {self.projector or 'gaussian'}) is random and takes no --basis"
            )
        if self.k is not None and self.projector in ("kronecker", "identity"):
            raise ConfigError(
                "the Kronecker projector takes --k-in and --k-out (per layer), not --k"
                if self.projector == "kronecker"
                else "the identity projector stores exact gradients: it takes no --k-in, --k-out or --k"
            )
        check_preconditioner(self.preconditioner, self.relative_damping, self.damping)
        self.job_config()  # validates the job's settings

    def job_config(self, **changes: Any) -> ExplainConfig:
        """The job's settings as an :class:`ExplainConfig` (what the shared job code reads)."""
        return ExplainConfig(
            out=self.out,
            task=self.task,
            params=self.params,
            head=self.head,
            dtype=self.dtype,
            device=self.device,
            batch_size=self.batch_size,
            train_size=self.train_size,
            epochs=self.epochs,
            lr=self.lr,
            weight_decay=self.weight_decay,
            cache_dir=self.cache_dir,
            progress=self.progress,
            top_k=1,
            num_test=1,
            **changes,
        )

    @property
    def fisher_torch_dtype(self) -> Any:
        """``fisher_dtype`` as a torch dtype (None: the store's)."""
        return products_dtype(self.fisher_dtype)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "settings") -> IndexConfig:
        return from_dict(cls, dict(values), source)

    def replace(self, **changes: Any) -> IndexConfig:
        return type(self).from_dict({**self.to_dict(), **changes}, "overrides")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QueryConfig:
    """Everything ``influencer query`` does: which store, which test examples, how to score.

    The job is the store's (recorded when it was built); ``task`` names its build function again
    when it has moved. Test examples: ``test_ids``, or ``num_test`` chosen as ``influencer explain``
    chooses them (misclassified with the highest loss, then correct ones over the labels), or
    ``all_test``; default: 6 chosen. ``preconditioner`` and ``damping``: None, the store's.
    """

    store: str  # the directory influencer index wrote
    task: str | None = None  # None: the store's
    test_ids: tuple[int, ...] | None = None
    num_test: int | None = None
    all_test: bool = False
    top_k: int = 10  # helpful and harmful training examples per test example
    out: str = "runs/query"  # top_k.json, the .npy arrays, query.log
    checkpoint: str | None = None  # finished test blocks (resumable); None: <out>/checkpoint
    overwrite: bool = False  # replace another query's blocks in --checkpoint instead of refusing
    block: int = 256  # test examples per block (the unit of checkpointing)
    preconditioner: str | None = None  # fisher, ekfac, none; None: the store's
    relative_damping: float | None = None  # x the mean eigenvalue; None: the store's
    damping: float | None = None  # absolute; None: the store's
    # the score products' dtype: "bfloat16" (faster, scores to about 3 digits), "float32",
    # "float64"; None: the job's
    score_dtype: str | None = None
    cache_dir: str | None = None  # the job cache (see ExplainConfig.cache_dir)
    device: str = "cpu"
    batch_size: int = 256
    progress: bool = True

    def __post_init__(self) -> None:
        if self.test_ids is not None:
            object.__setattr__(self, "test_ids", tuple(self.test_ids))
        check_types(self)
        check_choice("score_dtype", self.score_dtype, SCORE_DTYPES)
        for name in ("store", "out"):
            if not getattr(self, name).strip():
                raise ConfigError(f"{name} (a directory) must not be empty")
        if self.checkpoint is not None and not self.checkpoint.strip():
            raise ConfigError(
                "checkpoint (a directory) must not be empty; leave it unset for <out>/checkpoint"
            )
        chosen = [
            flag
            for flag, given in (
                ("--test ids", self.test_ids is not None),
                ("--num-test", self.num_test is not None),
                ("--test all", self.all_test),
            )
            if given
        ]
        if len(chosen) > 1:
            raise ConfigError(f"choose the test examples one way: {' or '.join(chosen)}, not both")
        check_positive(self, "top_k", "block", "batch_size", "num_test")
        check_preconditioner(self.preconditioner, self.relative_damping, self.damping)
        self.job_config(
            {"task": None, "params": None, "head": None, "dtype": "float64"}
        )  # validates the rest

    def job_config(self, job: Mapping[str, Any], **changes: Any) -> ExplainConfig:
        """The store's ``job`` settings (:data:`JOB_FIELDS`) with this query's as an
        :class:`ExplainConfig` (what the shared job and evaluation code reads)."""
        values = {name: job[name] for name in JOB_FIELDS if name in job}
        if self.task is not None:
            values["task"] = self.task
        return ExplainConfig(
            **values,
            out=self.out,
            test_ids=self.test_ids,
            num_test=self.num_test if self.num_test is not None else ExplainConfig.num_test,
            top_k=self.top_k,
            device=self.device,
            batch_size=self.batch_size,
            progress=self.progress,
            preconditioner=self.preconditioner,
            relative_damping=self.relative_damping,
            damping=self.damping,
            cache_dir=self.cache_dir,
            **changes,
        )

    @property
    def score_torch_dtype(self) -> Any:
        """``score_dtype`` as a torch dtype (None: the job's)."""
        return products_dtype(self.score_dtype)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "settings") -> QueryConfig:
        return from_dict(cls, dict(values), source)

    def replace(self, **changes: Any) -> QueryConfig:
        return type(self).from_dict({**self.to_dict(), **changes}, "overrides")
