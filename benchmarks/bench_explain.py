"""Time ``influencer explain`` (the built-in digits CNN job) against one training epoch of its model.

For each device (CPU, and CUDA when present) the job runs three times in a fresh run directory:

* ``fresh``: trains the model and computes everything;
* ``cached``: the same inputs again, which must reuse the cached model, gradients and solves;
* ``influence only``: the model cached but influence recomputed (a different damping), which times
  the influence part on its own.

The unit of comparison is one epoch of the same training (Adam, same data, batch size and device),
timed after a warm-up epoch. Usage::

    python benchmarks/bench_explain.py                        # CPU (+ CUDA when available)
    python benchmarks/bench_explain.py --devices cpu --threads 2 --json out/bench_explain.json
    python benchmarks/bench_explain.py --agreement            # also: default vs full-network scores

``--agreement`` compares the job's default (head-only Hessian, CG) with influence over every
parameter of the network (Gauss-Newton curvature, exact dense solve in float64), which is what the
default approximates: Spearman correlation of the scores and overlap of the top-k lists.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from influencer.app.commands.explain import explain
from influencer.app.settings.explain import ExplainConfig
from influencer.datasets import load_digits
from influencer.models import SmallCNN
from influencer.tasks import ClassificationTask
from influencer.training import train_minibatch

STAGES = ("build", "evaluate", "fit", "directions", "gradients", "report", "total")


def epoch_seconds(config: ExplainConfig, device: torch.device, repeats: int = 3) -> float:
    """Median time of one training epoch of the job's model on its data (after a warm-up epoch)."""
    split = load_digits(images=True, seed=0)
    n = len(split.x_train) if config.train_size is None else config.train_size
    train = (split.x_train[:n], split.y_train[:n])
    task = ClassificationTask(weight_decay=config.weight_decay)
    torch.manual_seed(config.seed)
    model = SmallCNN(channels=config.channels)
    kwargs = {"lr": config.lr, "batch_size": config.train_batch_size, "device": device}
    train_minibatch(model, task, train, epochs=1, **kwargs)  # warm-up (allocations, kernels)
    times = []
    for seed in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        train_minibatch(model, task, train, epochs=1, seed=seed, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def bench_device(device: str, base: ExplainConfig) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-explain-") as tmp:
        config = base.replace(out=str(Path(tmp) / "run"), device=device, progress=False)
        fresh = explain(config, console=False)
        cached = explain(config, console=False)
        changed = explain(config.replace(damping=config.effective_damping * 2), console=False)
    epoch = epoch_seconds(config, torch.device(device))
    influence = changed.timings.get("directions", 0.0) + changed.timings.get("gradients", 0.0)
    return {
        "device": device,
        "epoch_s": epoch,
        "epochs_trained": config.epochs,
        "test_accuracy": fresh.accuracy,
        "fresh": fresh.timings,
        "cached": cached.timings,
        "influence_only": changed.timings,
        "ratios": {
            "fresh_job_per_epoch": fresh.timings["total"] / epoch,
            "cached_job_per_epoch": cached.timings["total"] / epoch,
            "influence_part_per_epoch": influence / epoch,
            "influence_job_per_epoch": changed.timings["total"] / epoch,
        },
        "n_train": fresh.scores.shape[1],
        "n_test_explained": fresh.scores.shape[0],
        "num_parameters": fresh.summary["num_parameters"],
        "solver": fresh.summary["solver"],
    }


def agreement(base: ExplainConfig, device: str, top: int = 10) -> dict[str, Any]:
    """Default scores vs influence over the whole network (GGN, exact float64 solve)."""
    from influencer import Exact, Influence
    from influencer._kernel.stats import spearman

    with tempfile.TemporaryDirectory(prefix="bench-explain-") as tmp:
        config = base.replace(out=str(Path(tmp) / "run"), device=device, progress=False)
        result = explain(config, console=False)
        from influencer.app.job.job import digits_job
        from influencer.app.run.store import RunStore

        with RunStore(config.out) as store:
            job = digits_job(config.replace(params=("all",)), store, torch.device(device))  # the whole CNN
    start = time.perf_counter()
    full = Influence(
        job.model,
        job.task,
        job.train,
        estimator=Exact(damping=config.effective_damping, max_params=10**6),
        curvature="gauss_newton",
        device=device,
        dtype=torch.float64,
    ).fit()
    test = job.test.take(torch.as_tensor(result.test_ids))
    reference = full.scores(test).cpu().numpy()  # (m, n)
    seconds = time.perf_counter() - start
    rows = []
    for j in range(len(reference)):
        a, b = result.scores[j], reference[j]
        overlap_help = len(set(np.argsort(-a)[:top]) & set(np.argsort(-b)[:top])) / top
        overlap_harm = len(set(np.argsort(a)[:top]) & set(np.argsort(b)[:top])) / top
        rows.append(
            {
                "spearman": spearman(a, b),
                "top_helpful_overlap": overlap_help,
                "top_harmful_overlap": overlap_harm,
            }
        )
    return {
        "reference": f"all {full.p} parameters, Gauss-Newton, exact float64 solve",
        "reference_seconds": seconds,
        "per_test": rows,
        "mean_spearman": float(np.mean([r["spearman"] for r in rows])),
        "mean_top_helpful_overlap": float(np.mean([r["top_helpful_overlap"] for r in rows])),
        "mean_top_harmful_overlap": float(np.mean([r["top_harmful_overlap"] for r in rows])),
    }


def table(results: list[dict[str, Any]]) -> str:
    header = ["device", "run", *STAGES, "x epoch"]
    lines = []
    for r in results:
        for name in ("fresh", "cached", "influence_only"):
            t = r[name]
            cells = [r["device"], name] + [f"{t.get(s, 0.0):.2f}" for s in STAGES]
            cells.append(f"{t['total'] / r['epoch_s']:.1f}")
            lines.append(cells)
    widths = [max(len(str(row[i])) for row in [header, *lines]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
    out = [fmt.format(*header), fmt.format(*["-" * w for w in widths])] + [fmt.format(*row) for row in lines]
    for r in results:
        ratios = r["ratios"]
        out.append(
            f"{r['device']}: one training epoch {r['epoch_s']:.3f} s; whole job (fresh, "
            f"{r['epochs_trained']} epochs of training included) = {ratios['fresh_job_per_epoch']:.1f} "
            f"epochs; influence part (solves + gradients) = {ratios['influence_part_per_epoch']:.1f} "
            f"epochs; cached re-run = {ratios['cached_job_per_epoch']:.1f} epochs; test accuracy "
            f"{100 * r['test_accuracy']:.1f}%"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--devices", default=None, help="comma-separated, default: cpu (+ cuda when available)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument("--train-size", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--num-test", type=int, default=None)
    parser.add_argument("--agreement", action="store_true", help="compare with full-network influence")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = (
        args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    )
    overrides = {
        k: v
        for k, v in (("train_size", args.train_size), ("epochs", args.epochs), ("num_test", args.num_test))
        if v
    }
    base = ExplainConfig(**overrides)
    results = [bench_device(d, base) for d in devices]
    print(table(results))
    payload: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
        "settings": base.to_dict(),
        "results": results,
    }
    if args.agreement:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        payload["agreement"] = agreement(base, device)
        a = payload["agreement"]
        print(
            f"default vs {a['reference']}: mean Spearman {a['mean_spearman']:.3f}, top-10 overlap helpful "
            f"{a['mean_top_helpful_overlap']:.2f} / harmful {a['mean_top_harmful_overlap']:.2f} "
            f"(reference took {a['reference_seconds']:.1f} s on {device})"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=2, default=str) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
