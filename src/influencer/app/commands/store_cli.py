"""``influencer index`` and ``influencer query``: a gradient store on the command line.

    influencer index --task mypkg.jobs:build --out runs/store --projector kronecker --k-in 32 --k-out 32
    influencer query --store runs/store --test all --top-k 10 --out runs/query
    influencer explain --store runs/store --test-ids 3,17

``index`` projects every training gradient of the job once and streams it to the store
(:mod:`~influencer.app.commands.index`); the same command again resumes an interrupted build or does
nothing. ``query`` streams the store into the most helpful and harmful training examples of any
number of test examples (:mod:`~influencer.app.commands.query`), in bounded memory and resumable.
``explain --store`` (registered in :mod:`~influencer.app.commands.cli`) writes the usual report with scores
from the store (:mod:`~influencer.app.commands.explain_store`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from influencer._kernel.errors import InfluencerError
from influencer._kernel.extras import MissingExtraError, missing_message

try:
    import click
except ModuleNotFoundError:  # pragma: no cover - the app extra is not installed
    raise MissingExtraError(missing_message(["click"], "the influencer command line", "app")) from None
from influencer.app.settings.explain import DTYPES, PRECONDITIONERS, read_toml
from influencer.app.settings.store import BASES, PROJECTORS, IndexConfig, QueryConfig

__all__ = ["add_commands", "explain_store_flags", "refuse_with_store"]

# Flags of `explain` that choose how influence is computed or which job is built: with --store the
# store fixes them, so giving one is an error rather than silently ignored.
_FIXED_BY_STORE = (
    "estimator", "estimator_option", "on_unconverged", "curvature", "hessian_size", "hessian_sampler",
    "params", "head", "dtype", "train_size", "epochs", "lr", "weight_decay",
)  # fmt: skip


def _flag(name: str) -> str:
    return "-o" if name == "estimator_option" else "--" + name.replace("_", "-")


def refuse_with_store(flags: dict[str, Any], options: tuple[str, ...]) -> None:
    """One-line error for an ``explain`` flag that a gradient store fixes (with ``--store``)."""
    given = [n for n in _FIXED_BY_STORE if flags.get(n) is not None] + (
        ["estimator_option"] if options else []
    )
    if flags.get("store") is not None and given:
        raise click.UsageError(
            f"{_flag(given[0])} does not apply with --store: the store fixes the job and how gradients are "
            "computed; build another store with influencer index, or choose --preconditioner/--damping"
        )
    if flags.get("store") is None and flags.get("preconditioner") is not None:
        raise click.UsageError(
            "--preconditioner applies to scores from a gradient store: give --store DIR as well"
        )


def explain_store_flags() -> list[click.Option]:
    """``--store`` and ``--preconditioner`` of ``influencer explain``."""
    return [
        click.Option(
            ["--store"],
            help="Score from this gradient store (built by `influencer index`) instead of exact gradients; "
            "the job is the store's. --damping is then relative to the curvature's mean eigenvalue.",
        ),
        click.Option(
            ["--preconditioner"],
            type=click.Choice(PRECONDITIONERS),
            help="With --store: the projected Fisher, EK-FAC (before projection) or none.  "
            "[default: the store's]",
        ),
    ]


def _on_path(task: str | None) -> None:
    """Make modules in the current folder importable (for ``task``, or a store's recorded task)."""
    if task is not None and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: modules in the current folder import


def _run(work: Callable[[], str], out: str | None) -> None:
    """Run a command, turning library errors and unwritable directories into one-line errors."""
    try:
        message = work()
    except InfluencerError as exc:
        raise click.ClickException(str(exc)) from exc
    except OSError as exc:  # the directory cannot be written: read-only, full disk, long name, ...
        from influencer.app.run.store import describe_os_error

        raise click.ClickException(describe_os_error(exc, out)) from exc
    click.echo(message)


def _settings(config_file: str | None, flags: dict[str, Any]) -> dict[str, Any]:
    """The TOML file's settings, then the flags that were given."""
    values: dict[str, Any] = read_toml(config_file) if config_file else {}
    values.update({k: v for k, v in flags.items() if v is not None})
    return values


def _ids(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.replace(",", " ").split())
    except ValueError:
        raise click.BadParameter(f"expected 'all' or comma-separated test ids, got {text!r}") from None


_CONFIG = click.option(
    "--config", "config_file", type=click.Path(dir_okay=False), help="TOML file of settings."
)
_PROGRESS = click.option("--progress/--no-progress", default=None, help="Progress bars.  [default: on]")
_QUIET = click.option("--quiet", is_flag=True, help="Log to the directory's log file only; no progress bars.")
_DEVICE = click.option("--device", help="cpu, cuda or cuda:N.  [default: cpu]")


@click.command("index")
@_CONFIG
@click.option(
    "--task",
    help="package.module:function returning (task, model, train, test); default: digits CNN. The module "
    "is imported and the function called, as Python code with your permissions: name only code you trust.",
)
@click.option(
    "--out", help="Store directory (projected gradients, index.json, index.log).  [default: runs/index]"
)
@click.option(
    "--projector",
    type=click.Choice(PROJECTORS),
    help="kronecker: P_out x P_in per nn.Linear/nn.Conv2d layer; gaussian, rademacher: dense, any "
    "parameters; identity: the exact gradients.  [default: kronecker when every parameter is in such "
    "a layer]",
)
@click.option("--k-in", type=int, help="Kronecker: projected input dimension per layer.  [default: 32]")
@click.option("--k-out", type=int, help="Kronecker: projected output dimension per layer.  [default: 32]")
@click.option(
    "--k", "--dim", "k", type=int, help="Gaussian, Rademacher: projected dimension.  [default: 1024]"
)
@click.option(
    "--basis",
    type=click.Choice(BASES),
    help="Kronecker: pca (top eigenvectors of each layer's K-FAC factors, fitted once to the training "
    "data; better scores at the same k) or random.  [default: pca]",
)
@click.option("--seed", type=int, help="Seed of the random projection.  [default: 0]")
@click.option(
    "--preconditioner",
    type=click.Choice(PRECONDITIONERS),
    help="How queries precondition by default: the projected Fisher (stored with the gradients), EK-FAC "
    "(before projection) or none.  [default: fisher]",
)
@click.option(
    "--damping", type=float, help="Preconditioner damping, relative to its mean eigenvalue.  [default: 0.1]"
)
@click.option("--params", help="Parameters/modules to compute influence over, comma-separated, or 'all'.")
@click.option("--head", help="Influence over this module alone, on the network's features.")
@click.option("--dtype", type=click.Choice(DTYPES), help="Compute and storage dtype.  [default: float32]")
@_DEVICE
@click.option("--batch-size", type=int, help="Examples per gradient batch.  [default: 256]")
@click.option(
    "--chunk", type=int, help="Training examples per stored file (the unit of resuming).  [default: 4096]"
)
@click.option("--train-size", type=int, help="Digits job: use only the first N training images.")
@click.option("--epochs", type=int, help="Digits job: training epochs.  [default: 20]")
@click.option("--lr", type=float, help="Digits job: Adam learning rate.  [default: 0.01]")
@click.option("--weight-decay", type=float, help="Digits job: L2 weight decay.  [default: 0.01]")
@click.option(
    "--overwrite",
    is_flag=True,
    default=None,
    help="Rebuild a store built from other inputs instead of refusing.",
)
@_PROGRESS
@_QUIET
def index(config_file: str | None, quiet: bool, **flags: Any) -> None:
    """Build a gradient store: every training gradient, projected, on disk.

    Builds (or trains) the job as `explain` does, projects each training example's gradient and
    streams it to the store in chunks, with the projected Fisher. Run it again after an
    interruption to resume; on a finished store it does nothing. A store built from another model,
    data or settings is refused, saying what changed (--overwrite rebuilds it).
    """
    from influencer.app.commands.index import build_index

    if quiet and flags.get("progress") is None:
        flags["progress"] = False
    if flags.get("params") is not None:
        flags["params"] = tuple(t for t in flags["params"].replace(",", " ").split() if t)

    def work() -> str:
        config = IndexConfig.from_dict(_settings(config_file, flags), config_file or "settings")
        _on_path(config.task)
        built = build_index(config, console=not quiet)
        return f"Store: {built.root} ({built.index.n} training examples, k = {built.index.k})"

    _run(work, flags.get("out"))


@click.command("query")
@_CONFIG
@click.option("--store", help="The gradient store (the directory `influencer index --out` wrote).")
@click.option("--task", help="The store's build function, if it has moved.  [default: the store's]")
@click.option("--test", "test", help="Test examples: comma-separated ids, or 'all'.  [default: 6 chosen]")
@click.option("--num-test", type=int, help="How many test examples to choose automatically.")
@click.option(
    "--top-k", type=int, help="Helpful and harmful training examples per test example.  [default: 10]"
)
@click.option("--out", help="Run directory (top_k.json, .npy arrays, query.log).  [default: runs/query]")
@click.option("--checkpoint", help="Directory of finished test blocks.  [default: OUT/checkpoint]")
@click.option("--block", type=int, help="Test examples per block (the unit of resuming).  [default: 256]")
@click.option(
    "--preconditioner",
    type=click.Choice(PRECONDITIONERS),
    help="Projected Fisher, EK-FAC (before projection) or none.  [default: the store's]",
)
@click.option("--damping", type=float, help="Relative damping of the preconditioner.  [default: the store's]")
@_DEVICE
@click.option("--batch-size", type=int, help="Examples per gradient batch.  [default: 256]")
@click.option(
    "--overwrite", is_flag=True, default=None, help="Replace another query's blocks in --checkpoint."
)
@_PROGRESS
@_QUIET
def query(config_file: str | None, quiet: bool, test: str | None, **flags: Any) -> None:
    """The most helpful and harmful training examples of test examples, from a gradient store.

    Streams the stored gradients into running top-k lists, one block of test examples at a time
    (memory does not grow with the training set), logs the most helpful and harmful ids and
    writes top_k.json and helpful/harmful ids and scores as .npy arrays. Finished blocks are kept,
    so an interrupted query resumes.
    """
    from influencer.app.commands.query import query_store

    if quiet and flags.get("progress") is None:
        flags["progress"] = False
    if test is not None:
        if test.strip().lower() == "all":
            flags["all_test"] = True
        else:
            flags["test_ids"] = _ids(test)

    def work() -> str:
        values = _settings(config_file, flags)
        if "store" not in values:
            raise click.UsageError("--store DIR is required: the directory `influencer index --out` wrote")
        config = QueryConfig.from_dict(values, config_file or "settings")
        _on_path(config.task or "the store's")
        run = query_store(config, console=not quiet)
        return f"Top-k: {run.files['results']}"

    _run(work, flags.get("out"))


def add_commands(group: click.Group) -> None:
    """Register ``index`` and ``query`` on the click ``group``."""
    group.add_command(index)
    group.add_command(query)
