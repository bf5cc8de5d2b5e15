"""The ``influencer`` command line (needs click, from the ``app`` extra; the console script
:mod:`influencer.app.entry` checks for it first).

    influencer explain                                  # the built-in digits CNN, end to end
    influencer explain --test-ids 3,17 --top-k 8        # choose what to explain
    influencer explain --task mypkg.jobs:build --estimator lissa -o depth=500 --device cuda
    influencer explain --config job.toml --damping 0.01 # a TOML file, with flags overriding it
    influencer evaluate --check loo,lds                 # influence against real retraining
    influencer index --task mypkg.jobs:build --out runs/store   # a gradient store, for scale
    influencer query --store runs/store --test all --top-k 10   # top-k of every test example from it
    influencer explain --store runs/store               # the report, scored from the store

Each command resolves its settings once (defaults < ``--config`` TOML < flags) and runs the shared
steps of :mod:`influencer.app.steps`; the flags are declared once in :mod:`.options`.
"""

from __future__ import annotations

from typing import Any

from influencer import __version__
from influencer.app.commands.options import (
    INFLUENCE,
    JOB,
    METHOD,
    STORE,
    TESTS,
    click,
    names,
    on_path,
    options,
    quiet_progress,
    run_command,
    settings_values,
)
from influencer.app.commands.store_cli import add_commands
from influencer.app.settings.values import flag

# Flags of `explain` that choose how influence is computed or which job is built: with --store the
# store fixes them, so giving one is an error rather than silently ignored.
FIXED_BY_STORE = (
    "estimator", "estimator_option", "on_unconverged", "curvature", "hessian_size", "hessian_sampler",
    "params", "head", "dtype", "train_size", "epochs", "lr", "weight_decay", "method",
)  # fmt: skip


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="influencer")
def cli() -> None:
    """Explain a PyTorch model's predictions by its training data (influence functions)."""


def refuse_with_store(flags: dict[str, Any], estimator_options: tuple[str, ...]) -> None:
    """One line for an ``explain`` flag that a gradient store fixes (with ``--store``), or a store
    flag without one."""
    given = [n for n in FIXED_BY_STORE if flags.get(n) is not None] + (
        ["estimator_option"] if estimator_options else []
    )
    if flags.get("store") is not None and given:
        name = "-o" if given[0] == "estimator_option" else flag(given[0])
        raise click.UsageError(
            f"{name} does not apply with --store: the store fixes the job and how gradients are computed; "
            "build another store with influencer index, or choose --preconditioner/--damping/"
            "--relative-damping"
        )
    if flags.get("store") is None and flags.get("preconditioner") is not None:
        raise click.UsageError(
            "--preconditioner applies to scores from a gradient store: give --store DIR as well"
        )


@cli.command()
@options(
    JOB,
    click.option(
        "--out", help="Run directory (cache, scores, summary.json, report.html).  [default: runs/explain]"
    ),
    TESTS,
    click.option(
        "--top-k", type=int, help="Helpful and harmful training examples per test example.  [default: 5]"
    ),
    METHOD,
    INFLUENCE,
    STORE,
)
def explain(config_file: str | None, estimator_option: tuple[str, ...], quiet: bool, **flags: Any) -> None:
    """Find the training examples most responsible for a model's test predictions.

    Builds the job (the built-in digits CNN is trained once, in the job cache), reports its test
    accuracy, computes the influence of every training example on the chosen test examples, logs
    the most helpful and most harmful training ids, and writes scores.npy, summary.json,
    report.html and influence_vs_distance.png to the run directory. A second run with the same
    inputs reuses the cached gradients and solves; an interrupted run resumes. With --store DIR the
    scores come from a gradient store built by `influencer index`, and the report says so.
    """
    from influencer.app.commands.explain import explain as run
    from influencer.app.settings.explain import ExplainConfig

    quiet_progress(quiet, flags)
    refuse_with_store(flags, estimator_option)

    def work() -> str:
        config = ExplainConfig.from_dict(
            settings_values(config_file, flags, estimator_option), config_file or "settings"
        )
        on_path(config.task)
        result = run(config, console=not quiet)
        return f"Report: {result.files['report']}"

    run_command(work, flags.get("out"))


@cli.command()
@options(
    JOB,
    click.option("--out", help="Run directory (evaluation.json, plots, log).  [default: runs/evaluate]"),
    TESTS,
    METHOD,
    INFLUENCE,
    click.option(
        "--check",
        "checks",
        help="Checks to run: loo, lds or both.  [default: loo,lds; lds with --method unrolled]",
    ),
    click.option("--loo-k", type=int, default=20, show_default=True, help="LOO: removals per test example."),
    click.option(
        "--loo-select",
        type=click.Choice(["magnitude", "helpful", "harmful", "random"]),
        default="magnitude",
        show_default=True,
        help="LOO: which training examples to remove.",
    ),
    click.option(
        "--subsets", type=int, default=20, show_default=True, help="LDS: random subsets to retrain on."
    ),
    click.option(
        "--setting",
        type=click.Choice(["seed-averaged", "single-model"]),
        default="seed-averaged",
        show_default=True,
        help="LDS ground truth: retrain on each subset (averaged over --seeds), or replay the one run "
        "that trained the model (its recipe, seed, start and order) with the left-out examples "
        "re-weighted by 1 - eps.",
    ),
    click.option(
        "--eps",
        type=float,
        help="Single-model LDS: how far the left-out examples are down-weighted (their weight is "
        "1 - eps; 1: removed, 0.001: the derivative itself).  [default: 1]",
    ),
    click.option(
        "--drop",
        type=float,
        help="LDS: fraction of the training data each subset leaves out (re-weights), 1 - alpha.  "
        "[default: 0.5; 0.1 with --setting single-model]",
    ),
    click.option("--alpha", type=float, help="LDS: fraction of the training data each subset keeps."),
    click.option(
        "--seeds", type=int, default=1, show_default=True, help="LDS: retraining seeds per subset, averaged."
    ),
    click.option("--lds-tests", type=int, default=50, show_default=True, help="LDS: test examples to score."),
)
def evaluate(
    config_file: str | None,
    estimator_option: tuple[str, ...],
    quiet: bool,
    checks: str | None,
    loo_k: int,
    loo_select: str,
    subsets: int,
    setting: str,
    eps: float | None,
    drop: float | None,
    alpha: float | None,
    seeds: int,
    lds_tests: int,
    **flags: Any,
) -> None:
    """Check the scores against real retraining: leave-one-out (predicted vs actual change of the
    test loss) and the linear datamodeling score over random subsets.

    Uses the same job and scores as `explain` with the same flags (influence with its parameters,
    curvature and estimator, or --method unrolled through the job's recipe); says how many
    retrainings it will do and about how long before it starts; retrains with the job's recipe
    (L-BFGS for a linear model or head, Adam from scratch for a network), or with --setting
    single-model replays the run that made the model with some examples re-weighted, and caches
    every refit in the job cache. Writes evaluation.json, loo.png and lds.png.
    """
    from influencer.app.commands.evaluate import EvaluateConfig, run_evaluation
    from influencer.app.settings.explain import ExplainConfig

    quiet_progress(quiet, flags)

    def work() -> str:
        values = settings_values(config_file, flags, estimator_option)
        values.setdefault("out", "runs/evaluate")
        config = ExplainConfig.from_dict(values, config_file or "settings")
        settings = EvaluateConfig(
            checks=names(checks), loo_k=loo_k, loo_select=loo_select, subsets=subsets, alpha=alpha,
            drop=drop, seeds=seeds, lds_tests=lds_tests, setting=setting, eps=eps,
        )  # fmt: skip
        on_path(config.task)
        result = run_evaluation(config, settings, console=not quiet)
        return f"Summary: {result.files['summary']}"

    run_command(work, flags.get("out"))


add_commands(cli)  # `influencer index`, `influencer query`


def main() -> None:
    """Console-script entry point."""
    cli()


if __name__ == "__main__":
    main()
