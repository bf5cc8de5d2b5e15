"""Which training subset should the Hessian be estimated on? Samplers compared on class removal.

For each sampler (random, class-stratified, feature-based, logit-based) and Hessian subset size
(fractions of the retained data), over several seeds, the class-removal update is computed with
H_R estimated on the sampled subset, and the script reports:

* F1 (test; step size chosen on a validation split), its mean and variance over seeds, and the F1
  of the plain formula (scale 1);
* stability of the influence estimates across seeds: the variance of the predicted test-loss
  changes (score var) and of the parameter update (upd var), both relative to the reference that
  uses all retained data, and the error to that reference (upd mse);
* CG iterations, wall time (sampling; H fit + solve) and the peak memory H fit + solve adds
  (CPU: growth of the process's peak resident set; CUDA: torch.cuda.max_memory_allocated).

    python -m reproductions.sampler_study  # digits MLP, 10 seeds, CPU
    python -m reproductions.sampler_study --seeds 20 --fractions 0.02 0.05 0.1

:func:`run_sampler_study` runs it for any samplers over a
:class:`~influencer.uses.unlearning.ClassRemoval` (the stability of the update ``d_s`` and of the
predicted test-loss changes ``q_s = G_test d_s`` is normalised by the reference computed with
``H_R`` on *all* retained data; the error to it is variance + bias^2); :class:`PeakMemory` says
what memory is measured. The classifier and estimators come from :mod:`reproductions.unlearning`.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import json
import math
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from influencer._kernel.progress import progress_bar
from influencer.errors import ConfigError
from influencer.plotting import pyplot, save_png
from influencer.samplers import SAMPLERS, make_sampler
from influencer.samplers.base import Sampler
from influencer.uses.unlearning import ClassRemoval
from reproductions.unlearning import make_estimator, prepare_removal


class PeakMemory:
    """Peak memory a block of code adds above the level at its start, in bytes (``.peak``).

    * CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation at entry (tensors only).
    * CPU on Linux: the process's peak resident set size (``VmHWM``) minus ``VmRSS`` at entry,
      after returning freed heap pages to the OS (``malloc_trim``) and resetting the peak
      (``/proc/self/clear_refs``). This counts every allocation (torch's included, which
      ``tracemalloc`` cannot see), and also other threads' allocations during the block.
    * Elsewhere ``peak`` is ``None`` (not measured).
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.peak: int | None = None
        self.kind = "none"

    @staticmethod
    def _status(field: str) -> int:
        text = Path("/proc/self/status").read_text()
        return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE).group(1)) * 1024

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.kind = "cuda_allocated"
            return self
        try:
            gc.collect()
            with contextlib.suppress(OSError, AttributeError):  # glibc only: give freed pages back
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")
            self._base = self._status("VmRSS")
            self.kind = "cpu_rss"
        except (OSError, AttributeError, ValueError):
            self.kind = "none"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.kind == "cuda_allocated":
            torch.cuda.synchronize(self.device)
            self.peak = max(0, torch.cuda.max_memory_allocated(self.device) - self._base)
        elif self.kind == "cpu_rss":
            self.peak = max(0, self._status("VmHWM") - self._base)


@dataclasses.dataclass(frozen=True)
class StudyRun:
    """One (sampler, size, seed)."""

    sampler: str
    size: int
    seed: int
    scale: float  # chosen on validation
    forget_accuracy: float  # test, at the chosen scale
    retain_accuracy: float
    f1: float
    f1_unit: float  # test F1 of the plain formula (scale 1)
    iterations: int | None
    select_seconds: float
    solve_seconds: float
    peak_bytes: int | None
    update_error: float  # ||d_s - d_ref|| / ||d_ref||
    score_correlation: float  # Pearson(q_s, q_ref) over test points


@dataclasses.dataclass(frozen=True)
class StudyRow:
    """Aggregate over seeds for one (sampler, size)."""

    sampler: str
    size: int
    fraction: float  # of the retained data
    seeds: int
    f1_mean: float
    f1_var: float
    f1_unit_mean: float
    forget_accuracy: float
    retain_accuracy: float
    update_var: float  # mean_s ||d_s - mean d||^2 / ||d_ref||^2
    update_mse: float  # mean_s ||d_s - d_ref||^2 / ||d_ref||^2
    score_var: float  # mean_j var_s(q_sj) / mean_j q_ref_j^2
    score_correlation: float
    iterations: float
    select_seconds: float
    solve_seconds: float
    peak_mib: float | None


@dataclasses.dataclass(frozen=True)
class SamplerStudy:
    """All runs, their aggregates, and the full-data reference."""

    runs: tuple[StudyRun, ...]
    rows: tuple[StudyRow, ...]
    reference_f1: float  # H_R on all retained data, step size chosen on validation
    reference_f1_unit: float
    original_f1: float
    n_retained: int
    memory_kind: str
    prepare_seconds: dict[str, float]  # one-time feature / logit extraction per sampler

    def row(self, sampler: str, size: int) -> StudyRow:
        for r in self.rows:
            if r.sampler == sampler and r.size == size:
                return r
        raise KeyError((sampler, size))

    @property
    def samplers(self) -> list[str]:
        return list(dict.fromkeys(r.sampler for r in self.rows))

    @property
    def sizes(self) -> list[int]:
        return sorted({r.size for r in self.rows})

    def table(self) -> str:
        """Fixed-width table of the aggregates."""
        mem = "peak MiB" if self.memory_kind != "none" else "peak (n/a)"
        head = (
            f"{'sampler':<8} {'size':>5} {'frac':>5} {'F1 mean':>8} {'F1 var':>9} {'F1@1':>6} {'a_f':>6} "
            f"{'a_r':>6} {'upd var':>9} {'upd mse':>9} {'score var':>9} {'corr':>6} {'iters':>6} "
            f"{'select s':>8} {'solve s':>8} {mem:>10}"
        )
        lines = [head, "-" * len(head)]
        for r in self.rows:
            peak = f"{r.peak_mib:10.2f}" if r.peak_mib is not None else f"{'-':>10}"
            lines.append(
                f"{r.sampler:<8} {r.size:>5} {r.fraction:>5.3f} {r.f1_mean:>8.4f} {r.f1_var:>9.2e} "
                f"{r.f1_unit_mean:>6.3f} {r.forget_accuracy:>6.3f} {r.retain_accuracy:>6.3f} "
                f"{r.update_var:>9.3e} {r.update_mse:>9.3e} {r.score_var:>9.3e} {r.score_correlation:>6.3f} "
                f"{r.iterations:>6.1f} {r.select_seconds:>8.3f} {r.solve_seconds:>8.3f} {peak}"
            )
        lines.append(
            f"reference (H on all {self.n_retained} retained): F1 {self.reference_f1:.4f} "
            f"(scale 1: {self.reference_f1_unit:.4f}); original model F1 {self.original_f1:.4f}"
        )
        return "\n".join(lines)

    def variance_ratios(
        self, metric: str = "score_var", baseline: str = "random"
    ) -> dict[str, dict[int, float]]:
        """``metric(sampler) / metric(baseline)`` at each size (< 1: more stable than the baseline).

        ``metric`` is ``"score_var"`` (influence on test losses), ``"update_var"`` or ``"update_mse"``.
        """
        if metric not in ("score_var", "update_var", "update_mse", "f1_var"):
            raise ConfigError(f"metric must be score_var, update_var, update_mse or f1_var; got {metric!r}")
        out: dict[str, dict[int, float]] = {}
        for s in self.samplers:
            if s != baseline:
                out[s] = {
                    n: getattr(self.row(s, n), metric) / max(getattr(self.row(baseline, n), metric), 1e-300)
                    for n in self.sizes
                }
        return out

    def equal_f1_savings(self, baseline: str = "random", tolerance: float = 0.005) -> list[dict[str, Any]]:
        """For each baseline size, the smallest size of each other sampler whose mean F1 is at least
        the baseline's minus ``tolerance``, with the time and memory ratios of the two."""
        out = []
        for n in self.sizes:
            base = self.row(baseline, n)
            for s in self.samplers:
                if s == baseline:
                    continue
                ok = [m for m in self.sizes if m < n and self.row(s, m).f1_mean >= base.f1_mean - tolerance]
                if not ok:
                    continue
                r = self.row(s, min(ok))
                time_ratio = (r.select_seconds + r.solve_seconds) / max(
                    base.select_seconds + base.solve_seconds, 1e-12
                )
                mem_ratio = (
                    r.peak_mib / base.peak_mib if r.peak_mib is not None and base.peak_mib else float("nan")
                )
                out.append({
                    "sampler": s, "size": r.size, "f1": r.f1_mean, "baseline_size": n,
                    "baseline_f1": base.f1_mean, "time_ratio": time_ratio, "memory_ratio": mem_ratio,
                })  # fmt: skip
        return out

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        payload = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("runs", "rows")}
        payload["rows"] = [dataclasses.asdict(r) for r in self.rows]
        payload["runs"] = [dataclasses.asdict(r) for r in self.runs]
        path.write_text(json.dumps(payload, indent=1))
        return path

    def plot(self, out_dir: str | Path) -> list[Path]:
        """PNG plots of F1, stability and cost against subset size, one line per sampler."""
        plt = pyplot()

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        panels = [
            (
                "f1",
                "test F1 (step size chosen on validation)",
                lambda r: r.f1_mean,
                lambda r: math.sqrt(r.f1_var),
            ),
            ("update_variance", "update variance across seeds / ||d_ref||^2", lambda r: r.update_var, None),
            (
                "update_mse",
                "update error to full-H reference (MSE / ||d_ref||^2)",
                lambda r: r.update_mse,
                None,
            ),
            ("score_variance", "test-loss influence variance (normalised)", lambda r: r.score_var, None),
            (
                "seconds",
                "wall time: sampling + fit + solve (s)",
                lambda r: r.select_seconds + r.solve_seconds,
                None,
            ),
            ("peak_memory", "peak added memory of fit + solve (MiB)", lambda r: r.peak_mib or 0.0, None),
        ]
        paths = []
        for key, title, value, spread in panels:
            if key == "peak_memory" and self.memory_kind == "none":
                continue
            fig, ax = plt.subplots(figsize=(5.5, 4), dpi=120)
            for s in self.samplers:
                rows = [self.row(s, n) for n in self.sizes]
                y = np.array([value(r) for r in rows])
                ax.plot(self.sizes, y, marker="o", label=s)
                if spread is not None:
                    e = np.array([spread(r) for r in rows])
                    ax.fill_between(self.sizes, y - e, y + e, alpha=0.15)
            if key == "f1":
                ax.axhline(self.reference_f1, color="k", lw=0.8, ls="--", label="H on all retained")
            if key.endswith(("variance", "mse")):
                ax.set_yscale("log")
            ax.set_xscale("log")
            ax.set_xlabel("Hessian subset size (retained examples)")
            ax.set_title(title, fontsize=9)
            ax.legend(fontsize=8)
            fig.tight_layout()
            paths.append(save_png(fig, out_dir / f"{key}.png"))
        return paths


def _pearson(a: Tensor, b: Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    denominator = float(a.norm() * b.norm())
    return float(a @ b) / denominator if denominator > 0 else float("nan")


def run_sampler_study(
    removal: ClassRemoval,
    samplers: Sequence[Sampler],
    sizes: Sequence[int],
    seeds: Sequence[int],
    validation: Any,
    test: Any,
    *,
    scales: Sequence[float] = (0.5, 1.0, 2.0, 4.0, 8.0),
    measure_memory: bool = True,
    progress: bool = False,
) -> SamplerStudy:
    """Run every (sampler, size, seed) on ``removal`` and aggregate (see the module docstring).

    ``validation`` chooses the step size; ``test`` is only reported on. The reference update uses
    ``H_R`` on all retained data with the same estimator.
    """
    if not samplers or not sizes or len(seeds) < 2:
        raise ConfigError("need at least one sampler, one size and two seeds (variances need two)")
    names = [s.name for s in samplers]
    if len(set(names)) != len(names):
        raise ConfigError(f"samplers must have distinct names, got {names}")
    n_retained = len(removal.retain_ids)
    bad = [m for m in sizes if not 1 <= m <= n_retained]
    if bad:
        raise ConfigError(f"sizes must lie in [1, {n_retained}] (the retained examples), got {bad}")
    device = removal.influence.device
    reference = removal.update()
    ref_dir = reference.direction
    ref_search = removal.choose_scale(reference, validation, scales)
    reference_f1 = removal.metrics(test, reference, ref_search.scale).f1
    reference_f1_unit = removal.metrics(test, reference, 1.0).f1
    original_f1 = removal.metrics(test).f1
    G_test = removal.influence.gradients(test)  # (m_test, p): influence on test losses is G_test @ d
    ref_scores = G_test @ ref_dir  # (m_test,)

    context = removal.sampler_context()
    prepare: dict[str, float] = {}
    for sampler in samplers:  # one-time forward passes (features, logits), cached in the context
        start = time.perf_counter()
        sampler.select(context, 1, 0)
        prepare[sampler.name] = time.perf_counter() - start

    runs: list[StudyRun] = []
    rows: list[StudyRow] = []
    memory_kind = "none"
    grid = [(s, m) for s in samplers for m in sizes]
    for sampler, size in progress_bar(grid, "sampler study", progress, unit="config"):
        directions, scores = [], []
        for seed in seeds:
            start = time.perf_counter()
            ids = sampler.select(context, int(size), int(seed))
            select_seconds = time.perf_counter() - start
            tracker = PeakMemory(device) if measure_memory else None
            if tracker is not None:
                with tracker:
                    update = removal.update(ids)
                memory_kind = tracker.kind
            else:
                update = removal.update(ids)
            search = removal.choose_scale(update, validation, scales)
            chosen = removal.metrics(test, update, search.scale)
            unit = removal.metrics(test, update, 1.0)
            d = update.direction
            q = G_test @ d
            directions.append(d)
            scores.append(q)
            runs.append(StudyRun(
                sampler=sampler.name, size=int(size), seed=int(seed), scale=search.scale,
                forget_accuracy=chosen.forget_accuracy, retain_accuracy=chosen.retain_accuracy,
                f1=chosen.f1, f1_unit=unit.f1, iterations=update.iterations,
                select_seconds=select_seconds, solve_seconds=update.seconds,
                peak_bytes=tracker.peak if tracker is not None else None,
                update_error=float((d - ref_dir).norm() / ref_dir.norm()),
                score_correlation=_pearson(q, ref_scores),
            ))  # fmt: skip
        D = torch.stack(directions).double()  # (seeds, p)
        Q = torch.stack(scores).double()  # (seeds, m_test)
        ref_sq = float(ref_dir.double().pow(2).sum())
        mine = runs[-len(seeds) :]
        f1 = np.array([r.f1 for r in mine])
        peaks = [r.peak_bytes for r in mine]
        iters = [r.iterations for r in mine if r.iterations is not None]
        rows.append(StudyRow(
            sampler=sampler.name, size=int(size), fraction=int(size) / n_retained, seeds=len(seeds),
            f1_mean=float(f1.mean()), f1_var=float(f1.var(ddof=1)),
            f1_unit_mean=float(np.mean([r.f1_unit for r in mine])),
            forget_accuracy=float(np.mean([r.forget_accuracy for r in mine])),
            retain_accuracy=float(np.mean([r.retain_accuracy for r in mine])),
            update_var=float((D - D.mean(0)).pow(2).sum(1).mean()) / ref_sq * len(seeds) / (len(seeds) - 1),
            update_mse=float((D - ref_dir.double()).pow(2).sum(1).mean()) / ref_sq,
            score_var=float(Q.var(0, unbiased=True).mean() / ref_scores.double().pow(2).mean()),
            score_correlation=float(np.mean([r.score_correlation for r in mine])),
            iterations=float(np.mean(iters)) if iters else float("nan"),
            select_seconds=float(np.mean([r.select_seconds for r in mine])),
            solve_seconds=float(np.mean([r.solve_seconds for r in mine])),
            peak_mib=float(np.mean(peaks)) / 2**20 if all(p is not None for p in peaks) else None,
        ))  # fmt: skip
    return SamplerStudy(
        runs=tuple(runs),
        rows=tuple(rows),
        reference_f1=reference_f1,
        reference_f1_unit=reference_f1_unit,
        original_f1=original_f1,
        n_retained=n_retained,
        memory_kind=memory_kind,
        prepare_seconds=prepare,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="digits", choices=["digits", "mnist1d"])
    parser.add_argument("--forget-class", type=int, default=0)
    parser.add_argument("--samplers", nargs="+", default=["random", "class", "feature", "logit"],
                        choices=sorted(SAMPLERS))  # fmt: skip
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.02, 0.05, 0.1, 0.2],
                        help="Hessian subset sizes as fractions of the retained training data")  # fmt: skip
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--estimator", default="cg", choices=["cg", "lissa"])
    parser.add_argument("--damping", type=float, default=1e-2)
    parser.add_argument("--curvature", default="gauss_newton", choices=["gauss_newton", "hessian"])
    parser.add_argument("--scales", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0, 8.0])
    parser.add_argument("--validation", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0, help="data split and training seed")
    parser.add_argument("--tolerance", type=float, default=0.002, help="F1 difference counted as equal")
    parser.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=Path("out/hessian_sampling"))
    args = parser.parse_args()
    if args.seeds < 2:
        raise SystemExit("--seeds must be at least 2 (variances across seeds)")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    setup = prepare_removal(args.dataset, args.validation, args.seed, args.device)
    influence = setup.influence(make_estimator(args.estimator, args.damping), args.curvature, args.device)
    removal = ClassRemoval(influence, args.forget_class)
    n_retained = len(removal.retain_ids)
    sizes = sorted({max(2, round(f * n_retained)) for f in args.fractions})
    print(f"{args.dataset}: {len(setup.train[1])} train ({n_retained} retained after removing class "
          f"{args.forget_class}), {influence.p} parameters, trained in {setup.train_seconds:.1f}s; "
          f"{args.curvature} H, {args.estimator}(damping={args.damping}); sizes {sizes}; "
          f"{args.seeds} seeds; device {args.device}")  # fmt: skip
    start = time.perf_counter()
    study = run_sampler_study(
        removal, [make_sampler(name) for name in args.samplers], sizes, list(range(args.seeds)),
        setup.validation, setup.test, scales=args.scales, measure_memory=not args.no_memory,
    )  # fmt: skip
    print(f"study: {time.perf_counter() - start:.1f}s; memory measured as {study.memory_kind}; "
          f"one-time feature/logit passes (s): "
          + ", ".join(f"{k} {v:.3f}" for k, v in study.prepare_seconds.items()))  # fmt: skip
    print()
    print(study.table())
    baseline = "random" if "random" in args.samplers else args.samplers[0]
    for metric, label in (("score_var", "test-loss influence variance"), ("update_var", "update variance")):
        print(f"\n{label} relative to {baseline} at equal size (< 1 = more stable):")
        for name, ratios in study.variance_ratios(metric, baseline).items():
            print(f"  {name:<8} " + "  ".join(f"{n}: {r:.2f}" for n, r in ratios.items()))
    print(f"\nequal F1 (within {args.tolerance}) at a smaller size than {baseline}:")
    savings = study.equal_f1_savings(baseline, args.tolerance)
    if not savings:
        print("  none")
    for s in savings:
        print(f"  {s['sampler']:<8} size {s['size']:>4} (F1 {s['f1']:.4f}) vs {baseline} size "
              f"{s['baseline_size']:>4} (F1 {s['baseline_f1']:.4f}): time x{s['time_ratio']:.2f}, "
              f"peak memory x{s['memory_ratio']:.2f}")  # fmt: skip
    paths = study.plot(args.out)
    study.to_json(args.out / "study.json")
    print(f"\nplots: {', '.join(str(p) for p in paths)}; data: {args.out / 'study.json'}")


if __name__ == "__main__":
    main()
