"""The ``influencer`` command line, thin over :func:`influencer.app.commands.explain.explain` (needs click,
from the ``app`` extra; the console script :mod:`influencer.app.entry` checks for it first).

    influencer explain                                  # the built-in digits CNN, end to end
    influencer explain --test-ids 3,17 --top-k 8        # choose what to explain
    influencer explain --task mypkg.jobs:build --estimator lissa -o depth=500 --device cuda
    influencer explain --config job.toml --damping 0.01 # a TOML file, with flags overriding it
    influencer evaluate --method loo,lds                # influence against real retraining
    influencer index --task mypkg.jobs:build --out runs/store   # a gradient store, for scale
    influencer query --store runs/store --test all --top-k 10   # top-k of every test example from it
    influencer explain --store runs/store               # the report, scored from the store

Every flag corresponds to a field of :class:`influencer.app.settings.explain.ExplainConfig`; only the flags that
are given override the file's (or the default) values.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from influencer import __version__
from influencer._kernel.errors import InfluencerError
from influencer._kernel.extras import MissingExtraError, missing_message

try:
    import click
except ModuleNotFoundError:  # pragma: no cover - the app extra is not installed
    raise MissingExtraError(missing_message(["click"], "the influencer command line", "app")) from None
from influencer.app.settings.explain import CURVATURES, DTYPES, ExplainConfig, parse_option, read_toml
from influencer.app.commands.evaluate import add_command
from influencer.app.commands.store_cli import add_commands, explain_store_flags, refuse_with_store
from influencer.samplers import SAMPLERS


def _ints(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(t) for t in text.replace(",", " ").split())
    except ValueError as exc:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from exc


def _names(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(t for t in text.replace(",", " ").split() if t)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="influencer")
def cli() -> None:
    """Explain a PyTorch model's predictions by its training data (influence functions)."""


@cli.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML file of settings.")
@click.option(
    "--task",
    help="package.module:function returning (task, model, train, test); default: digits CNN. The module "
    "is imported and the function called, as Python code with your permissions: name only code you trust.",
)
@click.option(
    "--out", help="Run directory (cache, scores, summary.json, report.html).  [default: runs/explain]"
)
@click.option("--test-ids", help="Test examples to explain, e.g. 3,17,42.  [default: chosen automatically]")
@click.option("--num-test", type=int, help="How many test examples to choose automatically.  [default: 6]")
@click.option(
    "--top-k", type=int, help="Helpful and harmful training examples per test example.  [default: 5]"
)
@click.option(
    "--estimator", help="Inverse-Hessian method: cg, exact, lissa, arnoldi, identity, ...  [default: cg]"
)
@click.option("--damping", type=float, help="Added to the curvature's diagonal.  [default: 0.001]")
@click.option(
    "-o",
    "--estimator-option",
    "estimator_option",
    multiple=True,
    metavar="NAME=VALUE",
    help="Estimator option (repeatable), e.g. -o tol=1e-6 -o max_iter=500.",
)
@click.option(
    "--on-unconverged",
    type=click.Choice(["raise", "warn"]),
    help="An iterative solve (cg, lissa) that does not converge: stop with an error, or accept it with a "
    "warning in explain.log and summary.json.  [default: raise]",
)
@click.option(
    "--curvature", type=click.Choice(CURVATURES), help="Hessian or Gauss-Newton.  [default: hessian]"
)
@click.option(
    "--hessian-size",
    type=int,
    help="Estimate the curvature on this many training examples.  [default: all]",
)
@click.option(
    "--hessian-sampler",
    type=click.Choice(sorted(SAMPLERS)),
    help="How --hessian-size examples are chosen (class, feature, logit: representative).  [default: random]",
)
@click.option("--params", help="Parameters/modules to compute influence over, comma-separated, or 'all'.")
@click.option(
    "--head",
    help="Influence over this module alone (e.g. classifier), on the network's features computed once.",
)
@click.option("--dtype", type=click.Choice(DTYPES), help="Compute dtype for influence.  [default: float64]")
@click.option("--device", help="cpu, cuda or cuda:N.  [default: cpu]")
@click.option("--batch-size", type=int, help="Examples per training-gradient chunk.  [default: 128]")
@click.option("--train-size", type=int, help="Digits job: use only the first N training images.")
@click.option("--epochs", type=int, help="Digits job: training epochs.  [default: 20]")
@click.option("--lr", type=float, help="Digits job: Adam learning rate.  [default: 0.01]")
@click.option("--weight-decay", type=float, help="Digits job: L2 weight decay.  [default: 0.01]")
@click.option(
    "--seed", type=int, help="Digits job seed; also seeds the choice of test examples.  [default: 0]"
)
@click.option("--progress/--no-progress", default=None, help="Progress bars.  [default: on]")
@click.option("--quiet", is_flag=True, help="Log to explain.log in the run directory only; no progress bars.")
def explain(config_file: str | None, estimator_option: tuple[str, ...], quiet: bool, **flags: Any) -> None:
    """Find the training examples most responsible for a model's test predictions.

    Trains (or loads from the run directory) the model, reports its test accuracy, computes the
    influence of every training example on the chosen test examples, logs the most helpful and
    most harmful training ids, and writes scores.npy, summary.json, report.html and
    influence_vs_distance.png to the run directory. A second run with the same inputs reuses the
    cached gradients and solves; an interrupted run resumes. With --store DIR the scores come from a
    gradient store built by `influencer index` (projected gradients), and the report says so.
    """
    from influencer.app.commands.explain import explain as run

    run_dir = None
    try:
        if quiet and flags.get("progress") is None:
            flags["progress"] = False
        refuse_with_store(flags, estimator_option)
        config = build_config(config_file, estimator_option, flags)
        run_dir = config.out
        if (config.task is not None or config.store is not None) and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # like `python -m`: modules in the current folder import
        result = run(config, console=not quiet)
    except InfluencerError as exc:
        raise click.ClickException(str(exc)) from exc
    except OSError as exc:  # the run directory cannot be written: read-only, full disk, long name, ...
        from influencer.app.run.store import describe_os_error

        raise click.ClickException(describe_os_error(exc, run_dir)) from exc
    click.echo(f"Report: {result.files['report']}")


def build_config(config_file: str | None, options: tuple[str, ...], flags: dict[str, Any]) -> ExplainConfig:
    """Defaults, then the TOML file, then the flags that were given."""
    values: dict[str, Any] = read_toml(config_file) if config_file else {}
    base = ExplainConfig.from_dict(values, config_file or "settings")
    given = {k: v for k, v in flags.items() if v is not None}
    if "test_ids" in given:
        given["test_ids"] = _ints(given["test_ids"])
    if "params" in given:
        given["params"] = _names(given["params"])
    if options:
        given["estimator_options"] = {**base.estimator_options, **dict(parse_option(o) for o in options)}
    return base.replace(**given)


explain.params.extend(explain_store_flags())  # --store, --preconditioner
add_command(cli, explain, build_config)  # `influencer evaluate`, with explain's influence options
add_commands(cli)  # `influencer index`, `influencer query`


def main() -> None:
    """Console-script entry point."""
    cli()


if __name__ == "__main__":
    main()
