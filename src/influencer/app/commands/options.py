"""The flags of the ``influencer`` commands, declared once and shared: a flag means one thing in every
command that has it. Declaring them needs only click and the torch-free settings values, so
``influencer --help`` answers at once; each command imports its work when it runs.

Every setting flag corresponds to a field of the command's settings dataclass; only flags that were
given override the TOML file's (or the default) values. Errors are one line that names flags, not
Python: :func:`run_command` turns the library's ``curvature='gauss_newton'`` into
``--curvature gauss_newton``.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Callable
from typing import Any

from influencer.extras import MissingExtraError, missing_message

try:
    import click
except ModuleNotFoundError:  # pragma: no cover - the app extra is not installed
    raise MissingExtraError(missing_message(["click"], "the influencer command line", "app")) from None

from influencer.app.settings.values import (
    BASES,
    CURVATURES,
    DTYPES,
    METHODS,
    PRECONDITIONERS,
    PROJECTORS,
    SAMPLER_NAMES,
    parse_option,
    read_toml,
)
from influencer.errors import InfluencerError

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def _option(*names: str, **kw: Any) -> Decorator:
    return click.option(*names, **kw)


TASK_HELP = (
    "package.module:function returning (task, model, train, test); default: the built-in digits CNN. The "
    "module is imported and the function called, as Python code with your permissions: name only code "
    "you trust."
)

# The job: which model and data, where its cache is, how it is computed on.
JOB = [
    _option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML file of settings."),
    _option("--task", help=TASK_HELP),
    _option(
        "--cache-dir",
        help="The job cache (trained built-in model, a head's features, retrained models), shared by every "
        "command.  [default: $INFLUENCER_CACHE, else ~/.cache/influencer]",
    ),
    _option("--device", help="cpu, cuda or cuda:N.  [default: cpu]"),
    _option("--train-size", type=int, help="Digits job: use only the first N training images."),
    _option("--epochs", type=int, help="Digits job: training epochs.  [default: 20]"),
    _option("--lr", type=float, help="Digits job: Adam learning rate.  [default: 0.01]"),
    _option("--weight-decay", type=float, help="Digits job: L2 weight decay.  [default: 0.01]"),
    _option("--progress/--no-progress", default=None, help="Progress bars.  [default: on]"),
    _option("--quiet", is_flag=True, help="Log to the run directory's log file only; no progress bars."),
]

# Which parameters influence is computed over, and in which precision.
PARAMETERS = [
    _option("--params", help="Parameters/modules to compute influence over, comma-separated, or 'all'."),
    _option(
        "--head",
        help="Influence over this module alone (e.g. classifier), on the network's features computed once.",
    ),
]

DAMPING = [
    _option("--damping", type=float, help="Absolute damping, added to the curvature's diagonal."),
    _option(
        "--relative-damping",
        type=float,
        help="Damping relative to the curvature's mean eigenvalue (per layer for K-FAC, EK-FAC and a "
        "store's Fisher), e.g. 0.1.",
    ),
]

# How influence is computed with exact gradients (explain, evaluate).
INFLUENCE = [
    _option(
        "--estimator",
        help="Inverse-Hessian method: auto, exact, cg, blockcg, lissa, arnoldi, kfac, ekfac, identity.  "
        "[default: auto: Exact for a small model, EK-FAC over Linear/Conv layers otherwise]",
    ),
    *DAMPING,
    _option(
        "-o",
        "--estimator-option",
        "estimator_option",
        multiple=True,
        metavar="NAME=VALUE",
        help="Estimator option (repeatable), e.g. -o tol=1e-6 -o max_iter=500.",
    ),
    _option(
        "--on-unconverged",
        type=click.Choice(["raise", "warn"]),
        help="An iterative solve (cg, lissa) that does not converge: stop with an error, or accept it with a "
        "warning in the log and summary.json.  [default: raise]",
    ),
    _option(
        "--curvature",
        type=click.Choice(CURVATURES),
        help="Hessian or Gauss-Newton.  [default: the estimator's]",
    ),
    _option("--hessian-size", type=int, help="Estimate the curvature on this many training examples."),
    _option(
        "--hessian-sampler",
        type=click.Choice(SAMPLER_NAMES),
        help="How --hessian-size examples are chosen (class, feature, logit: representative).  "
        "[default: random]",
    ),
    *PARAMETERS,
    _option("--dtype", type=click.Choice(DTYPES), help="Compute dtype.  [default: float64]"),
    _option("--batch-size", type=int, help="Examples per training-gradient chunk.  [default: 128]"),
]

TESTS = [
    _option("--test-ids", help="Test examples, e.g. 3,17,42.  [default: chosen automatically]"),
    _option("--num-test", type=int, help="How many test examples to choose automatically.  [default: 6]"),
    _option(
        "--seed", type=int, help="Digits job seed; also seeds the choice of test examples.  [default: 0]"
    ),
]


class _MethodChoice(click.Choice):
    """``--method``'s choices; the checks ``loo``/``lds`` (``evaluate --method``'s meaning before
    ``--check``) get a pointer to ``--check`` instead of the bare list of choices."""

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> object:
        text = str(value)
        if text and set(text.replace(" ", "").split(",")) <= {"loo", "lds"}:
            self.fail(
                f"{text!r} names checks, not scores: use `influencer evaluate --check {text}` "
                f"(--method chooses the scores: {', '.join(METHODS)})",
                param,
                ctx,
            )
        return super().convert(value, param, ctx)


METHOD = _option(
    "--method",
    type=_MethodChoice(METHODS),
    help="influence: influence functions; unrolled: the exact derivative through the job's training "
    "recipe.  [default: influence]",
)
STORE = [
    _option(
        "--store",
        help="Score from this gradient store (built by `influencer index`) instead of exact gradients; the "
        "job is the store's.",
    ),
    _option(
        "--preconditioner",
        type=click.Choice(PRECONDITIONERS),
        help="With --store: the projected Fisher, EK-FAC (before projection) or none.  "
        "[default: the store's]",
    ),
]
PROJECTION = [
    _option(
        "--projector",
        type=click.Choice(PROJECTORS),
        help="kronecker: P_out x P_in per nn.Linear/nn.Conv2d layer; gaussian, rademacher: dense, any "
        "parameters; identity: the exact gradients.  [default: kronecker when every parameter is in such "
        "a layer]",
    ),
    _option("--k-in", type=int, help="Kronecker: projected input dimension per layer.  [default: 32]"),
    _option("--k-out", type=int, help="Kronecker: projected output dimension per layer.  [default: 32]"),
    _option(
        "--k", "--dim", "k", type=int, help="Gaussian, Rademacher: projected dimension.  [default: 1024]"
    ),
    _option(
        "--basis",
        type=click.Choice(BASES),
        help="Kronecker: pca (top eigenvectors of each layer's K-FAC factors, fitted once to the training "
        "data; better scores at the same k) or random.  [default: pca]",
    ),
]


def options(*groups: list[Decorator] | Decorator) -> Decorator:
    """Apply groups of options to a command, in order."""
    flat: list[Decorator] = []
    for g in groups:
        flat.extend(g if isinstance(g, list) else [g])

    def apply(f: Callable[..., Any]) -> Callable[..., Any]:
        for decorator in reversed(flat):
            f = decorator(f)
        return f

    return apply


# ---- from flags to settings -----------------------------------------------------------------------


def ints(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(t) for t in text.replace(",", " ").split())
    except ValueError as exc:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from exc


def names(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(t for t in text.replace(",", " ").split() if t)


def settings_values(
    config_file: str | None, flags: dict[str, Any], options: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The TOML file's settings, then the flags that were given (``-o`` options merged into the
    file's ``[estimator_options]``)."""
    values: dict[str, Any] = read_toml(config_file) if config_file else {}
    given = {k: v for k, v in flags.items() if v is not None}
    if "test_ids" in given:
        given["test_ids"] = ints(given["test_ids"])
    if "params" in given:
        given["params"] = names(given["params"])
    if options:
        given["estimator_options"] = {
            **values.get("estimator_options", {}),
            **dict(parse_option(o) for o in options),
        }
    return {**values, **given}


# ---- errors in the words of the command line ------------------------------------------------------

_ESTIMATOR_CALL = re.compile(r"(?:Influence\(\.\.\., )?estimator=([A-Za-z]+)\(([^()]*)\)\)?")
_KEYWORDS = {
    "damping": "--damping",
    "relative_damping": "--relative-damping",
    "curvature": "--curvature",
    "params": "--params",
    "dtype": "--dtype",
    "hessian_indices": "--hessian-size",
    "on_unconverged": "--on-unconverged",
}


def _estimator_flags(match: re.Match[str]) -> str:
    name, args = match.group(1).lower(), match.group(2)
    out = [f"--estimator {name}"]
    for part in (a.strip() for a in args.split(",") if a.strip()):
        key, _, value = part.partition("=")
        flag = _KEYWORDS.get(key.strip())
        out.append(f"{flag} {value.strip()}" if flag else f"-o {key.strip()}={value.strip()}")
    return " ".join(out)


def as_flags(message: str) -> str:
    """A library message in the words of the command line: ``estimator=CG(damping=0.01)`` ->
    ``--estimator cg --damping 0.01``, ``curvature='gauss_newton'`` -> ``--curvature gauss_newton``."""
    message = _ESTIMATOR_CALL.sub(_estimator_flags, message)
    message = re.sub(r"Influence\(\.\.\., ([^()]*)\)", r"\1", message)

    def keyword(match: re.Match[str]) -> str:
        return f"{_KEYWORDS[match.group(1)]} {match.group(2).strip(chr(39) + chr(34))}"

    pattern = r"\b(" + "|".join(_KEYWORDS) + r")=('[^']*'|\"[^\"]*\"|[\w.+-]+)"
    return re.sub(pattern, keyword, message)


def on_path(task: str | None) -> None:
    """Make modules in the current folder importable for ``--task`` (like ``python -m``)."""
    if task is not None and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def run_command(work: Callable[[], str], out: str | None) -> None:
    """Run a command, turning library errors and unwritable directories into one line naming flags.

    When the reader of the command's output goes away (``influencer explain 2>&1 | head``), the
    command stops quietly with status 141, as a Unix tool killed by SIGPIPE does, instead of an
    error about the pipe.
    """
    try:
        message = work()
        click.echo(message)
    except BrokenPipeError:
        _stop_quietly()
    except InfluencerError as exc:
        raise click.ClickException(as_flags(str(exc))) from exc
    except OSError as exc:  # the directory cannot be written: read-only, full disk, long name, ...
        from influencer.app.run.store import describe_os_error

        raise click.ClickException(describe_os_error(exc, out)) from exc


def _stop_quietly() -> None:
    """Exit with 128 + SIGPIPE, the standard streams sent to the null device first (Python flushes
    them on exit, which would fail on the closed pipe again)."""
    null = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            os.dup2(null, stream.fileno())
    raise SystemExit(141)


def quiet_progress(quiet: bool, flags: dict[str, Any]) -> None:
    if quiet and flags.get("progress") is None:
        flags["progress"] = False
