"""``influencer index`` and ``influencer query``: a gradient store on the command line.

    influencer index --task mypkg.jobs:build --out runs/store --projector kronecker --k-in 32 --k-out 32
    influencer query --store runs/store --test all --top-k 10 --out runs/query

``index`` projects every training gradient of the job once and streams it to the store
(:mod:`~influencer.app.commands.index`); the same command again resumes an interrupted build or does
nothing. ``query`` streams the store into the most helpful and harmful training examples of any
number of test examples (:mod:`~influencer.app.commands.query`), in bounded memory and resumable.
``explain --store`` (in :mod:`~influencer.app.commands.cli`) writes the usual report from the store.
"""

from __future__ import annotations

from typing import Any

from influencer.app.commands.options import (
    DAMPING,
    JOB,
    PARAMETERS,
    PROJECTION,
    click,
    names,
    on_path,
    options,
    quiet_progress,
    run_command,
    settings_values,
)
from influencer.app.settings.values import DTYPES, PRECONDITIONERS, SCORE_DTYPES

__all__ = ["add_commands"]


def _ids(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.replace(",", " ").split())
    except ValueError:
        raise click.BadParameter(f"expected 'all' or comma-separated test ids, got {text!r}") from None


@click.command("index")
@options(
    JOB,
    click.option(
        "--out", help="Store directory (projected gradients, index.json, index.log).  [default: runs/index]"
    ),
    PROJECTION,
    click.option("--seed", type=int, help="Seed of the random projection.  [default: 0]"),
    click.option(
        "--preconditioner",
        type=click.Choice(PRECONDITIONERS),
        help="How queries precondition by default: the projected Fisher (stored with the gradients), EK-FAC "
        "(before projection) or none.  [default: fisher]",
    ),
    DAMPING,
    PARAMETERS,
    click.option("--dtype", type=click.Choice(DTYPES), help="Compute and storage dtype.  [default: float32]"),
    click.option(
        "--fisher-dtype",
        type=click.Choice(SCORE_DTYPES),
        help="The projected Fisher's products: bfloat16 is faster on CPUs with AVX512-BF16 and on GPUs, "
        "the Fisher to about 3 digits.  [default: --dtype]",
    ),
    click.option("--batch-size", type=int, help="Examples per gradient batch.  [default: 256]"),
    click.option(
        "--chunk", type=int, help="Training examples per stored file (the unit of resuming).  [default: 4096]"
    ),
    click.option(
        "--overwrite",
        is_flag=True,
        default=None,
        help="Rebuild a store built from other inputs instead of refusing.",
    ),
)
def index(config_file: str | None, quiet: bool, **flags: Any) -> None:
    """Build a gradient store: every training gradient, projected, on disk.

    Builds the job as `explain` does (the built-in job from the shared job cache), projects each
    training example's gradient and streams it to the store in chunks, with the projected Fisher.
    Run it again after an interruption to resume; on a finished store it does nothing. A store built
    from another model, data or settings is refused, saying what changed (--overwrite rebuilds it).
    The default --relative-damping of queries is 0.1.
    """
    from influencer.app.commands.index import build_index
    from influencer.app.settings.store import IndexConfig

    quiet_progress(quiet, flags)
    if flags.get("params") is not None:
        flags["params"] = names(flags["params"])

    def work() -> str:
        config = IndexConfig.from_dict(settings_values(config_file, flags), config_file or "settings")
        on_path(config.task)
        built = build_index(config, console=not quiet)
        return f"Store: {built.root} ({built.index.n} training examples, k = {built.index.k})"

    run_command(work, flags.get("out"))


@click.command("query")
@options(
    click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML file of settings."),
    click.option("--store", help="The gradient store (the directory `influencer index --out` wrote)."),
    click.option(
        "--task",
        help="The build function of the store's job, package.module:function: needed for a store built with "
        "--task (a store never chooses the code that runs). Name only code you trust.",
    ),
    click.option(
        "--cache-dir", help="The job cache.  [default: $INFLUENCER_CACHE, else ~/.cache/influencer]"
    ),
    click.option("--test", "test", help="Test examples: comma-separated ids, or 'all'.  [default: 6 chosen]"),
    click.option("--num-test", type=int, help="How many test examples to choose automatically."),
    click.option(
        "--top-k", type=int, help="Helpful and harmful training examples per test example.  [default: 10]"
    ),
    click.option("--out", help="Run directory (top_k.json, .npy arrays, query.log).  [default: runs/query]"),
    click.option("--checkpoint", help="Directory of finished test blocks.  [default: OUT/checkpoint]"),
    click.option("--block", type=int, help="Test examples per block (the unit of resuming).  [default: 256]"),
    click.option(
        "--preconditioner",
        type=click.Choice(PRECONDITIONERS),
        help="Projected Fisher, EK-FAC (before projection) or none.  [default: the store's]",
    ),
    DAMPING,
    click.option(
        "--score-dtype",
        type=click.Choice(SCORE_DTYPES),
        help="The score products' dtype: bfloat16 is about 2.7x faster on CPUs with AVX512-BF16 and on "
        "GPUs, scores to about 3 digits.  [default: the job's]",
    ),
    click.option("--device", help="cpu, cuda or cuda:N.  [default: cpu]"),
    click.option("--batch-size", type=int, help="Examples per gradient batch.  [default: 256]"),
    click.option(
        "--overwrite", is_flag=True, default=None, help="Replace another query's blocks in --checkpoint."
    ),
    click.option("--progress/--no-progress", default=None, help="Progress bars.  [default: on]"),
    click.option("--quiet", is_flag=True, help="Log to query.log only; no progress bars."),
)
def query(config_file: str | None, quiet: bool, test: str | None, **flags: Any) -> None:
    """The most helpful and harmful training examples of test examples, from a gradient store.

    Streams the stored gradients into running top-k lists, one block of test examples at a time
    (memory does not grow with the training set), logs the most helpful and harmful ids and
    writes top_k.json and helpful/harmful ids and scores as .npy arrays. Finished blocks are kept,
    so an interrupted query resumes.
    """
    from influencer.app.commands.query import query_store
    from influencer.app.settings.store import QueryConfig

    quiet_progress(quiet, flags)
    if test is not None:
        if test.strip().lower() == "all":
            flags["all_test"] = True
        else:
            flags["test_ids"] = ",".join(str(i) for i in _ids(test))

    def work() -> str:
        values = settings_values(config_file, flags)
        if "store" not in values:
            raise click.UsageError("--store DIR is required: the directory `influencer index --out` wrote")
        config = QueryConfig.from_dict(values, config_file or "settings")
        on_path(config.task)
        run = query_store(config, console=not quiet)
        return f"Top-k: {run.files['results']}"

    run_command(work, flags.get("out"))


def add_commands(group: click.Group) -> None:
    """Register ``index`` and ``query`` on the click ``group``."""
    group.add_command(index)
    group.add_command(query)
