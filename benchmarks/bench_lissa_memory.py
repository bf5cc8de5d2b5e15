"""Peak memory of LiSSA at depth 10 vs depth 1000: it must not grow with depth.

Each (library, depth) is measured in ``--repeats`` fresh subprocesses. A worker loads the same
trained model, builds the library's LiSSA, runs a depth-1 warm-up solve (so one-off allocations are
in the baseline), records the baseline, solves at the target depth and reports

* ``growth``: peak RSS after the solve minus the baseline (``resource.getrusage(RUSAGE_SELF)
  .ru_maxrss``, a high-water mark), and on CUDA ``torch.cuda.max_memory_allocated`` growth;
* the wall time of the solve.

The medians over repeats are printed per depth, with the ratio of peak RSS (depth 1000 / depth 10).
Exit status is non-zero if influencer's median growth at the largest depth exceeds the smallest
depth's by more than ``--tolerance-mib`` (default 16 MiB: allocator noise; a solve that kept one
``(k, p)`` tensor per step would add ``depth x k x p x 8`` bytes, here ~1.2 GiB at depth 1000).

    .venv-bench/bin/python benchmarks/bench_lissa_memory.py              # influencer + peers, CPU
    .venv-bench/bin/python benchmarks/bench_lissa_memory.py --quick      # smaller, < 1 minute
    .venv-bench/bin/python benchmarks/bench_lissa_memory.py --device cuda --json out/lissa_mem.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

os.environ.setdefault("TQDM_DISABLE", "1")

import torch
from common import format_table, machine, versions, write_json

LIBRARIES = ("influencer", "dattri", "pydvl")  # captum has no LiSSA
MIB = 2**20


# ---- the shared problem --------------------------------------------------------------------------


def build(hidden: int, n_test: int, device: str):
    """Digits, an MLP ``64 -> hidden -> 10`` (tanh), float64; the model is untrained until loaded."""
    from influencer import ClassificationTask
    from influencer.datasets import load_digits
    from influencer.models import MLP

    split = load_digits(dtype=torch.float64)
    torch.manual_seed(0)
    model = MLP(64, (hidden,), 10).to(device, torch.float64)
    task = ClassificationTask(weight_decay=1e-3)
    train = (split.x_train.to(device), split.y_train.to(device))
    test = (split.x_test[:n_test].to(device), split.y_test[:n_test].to(device))
    return model, task, train, test


def prepare_state(args: argparse.Namespace, path: str) -> dict:
    """Train once (Adam), find a safe LiSSA scale, save what every worker needs."""
    from influencer import Influence, LiSSA
    from influencer.training import train_minibatch

    model, task, train, _ = build(args.hidden, args.n_test, args.device)
    train_minibatch(model, task, train, epochs=args.epochs, lr=1e-2, batch_size=64, seed=0)
    inf = Influence(model, task, train, estimator=LiSSA(damping=args.damping, depth=1)).fit()
    top = abs(inf.curvature.largest_eigenvalue())
    # Generous: minibatch Hessians can exceed the full one's top eigenvalue; accuracy is not measured.
    scale = 3.0 * (top + args.damping)
    torch.save({"state": model.state_dict(), "scale": scale}, path)
    return {"largest_eigenvalue": top, "scale": scale, "num_params": inf.p}


# ---- workers: one library, one depth, in a fresh process -----------------------------------------


def lissa_solver(lib: str, depth: int, model, task, train, test, damping: float, scale: float, batch: int):
    """A function ``() -> (k, p) tensor`` running the library's LiSSA on the test gradients."""
    if lib == "influencer":
        from influencer import Influence, LiSSA

        inf = Influence(model, task, train, estimator=LiSSA(damping=damping, depth=1, scale=scale)).fit()
        grads = inf.gradients(test)
        solver = LiSSA(damping=damping, depth=depth, scale=scale, batch_size=batch).fit(inf.curvature)
        return lambda: solver.solve(grads)
    if lib == "dattri":
        from dattri.algorithm import IFAttributorLiSSA
        from dattri.task import AttributionTask
        from torch.func import functional_call
        from torch.nn import functional as F
        from torch.utils.data import DataLoader, TensorDataset

        dtype = next(model.parameters()).dtype
        wd = task.weight_decay

        def cross_entropy(params, data):
            x, y = data  # dattri's LiSSA hands data over as float32: cast back
            return F.cross_entropy(functional_call(model, params, (x.to(dtype),)), y.long())

        def objective(params, data):
            return cross_entropy(params, data) + 0.5 * wd * sum((q * q).sum() for q in params.values())

        att = IFAttributorLiSSA(
            AttributionTask(
                loss_func=objective, model=model, checkpoints=model.state_dict(), target_func=cross_entropy
            ),
            device=str(train[0].device),
            batch_size=batch,
            recursion_depth=depth,
            damping=damping / scale,
            scaling=scale,
        )
        att.cache(DataLoader(TensorDataset(*train), batch_size=len(train[0])))
        test_rep = att.generate_test_rep(0, tuple(t.unsqueeze(0) for t in test))
        return lambda: att.transform_test_rep(0, test_rep)
    if lib == "pydvl":
        from pydvl.influence.torch import LissaInfluence
        from torch.nn import functional as F
        from torch.utils.data import DataLoader, TensorDataset

        inf = LissaInfluence(
            model,
            F.cross_entropy,
            regularization=task.weight_decay + damping,
            maxiter=depth,
            scale=scale,
            rtol=0.0,
            warn_on_max_iteration=False,
        ).fit(DataLoader(TensorDataset(*train), batch_size=batch, shuffle=False))
        return lambda: inf.influence_factors(*test)
    raise ValueError(f"unknown library {lib!r}")


def worker(args: argparse.Namespace) -> None:
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    saved = torch.load(args.state, weights_only=True)
    model, task, train, test = build(args.hidden, args.n_test, args.device)
    model.load_state_dict(saved["state"])
    model.eval()
    scale = saved["scale"]

    def make(depth: int):
        return lissa_solver(args.lib, depth, model, task, train, test, args.damping, scale, args.batch)

    warm = make(1)
    warm()  # one step allocates everything a step needs: that belongs to the baseline
    solve = make(args.depth)
    del warm
    gc.collect()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base_cuda = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    out = solve()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {
        "lib": args.lib,
        "depth": args.depth,
        "seconds": seconds,
        "base_rss": base_rss,
        "peak_rss": peak_rss,
        "growth_rss": peak_rss - base_rss,
        "finite": bool(torch.isfinite(out).all()),
    }
    if device.type == "cuda":
        result["growth_cuda"] = torch.cuda.max_memory_allocated(device) - base_cuda
    print("RESULT " + json.dumps(result), flush=True)


def measure(args: argparse.Namespace, lib: str, depth: int, state: str) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        "--lib",
        lib,
        "--depth",
        str(depth),
        "--state",
        state,
        *("--device", args.device, "--hidden", str(args.hidden), "--n-test", str(args.n_test)),
        *("--damping", str(args.damping), "--batch", str(args.batch)),
    ]
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"lib": lib, "depth": depth, "error": " | ".join(tail)[:300]}
    return json.loads(lines[-1][len("RESULT ") :])


# ---- the driver ----------------------------------------------------------------------------------


def describe(run: dict) -> str:
    if "error" in run:
        return "error: " + run["error"]
    text = f"RSS growth {run['growth_rss'] / MIB:.1f} MiB, solve {run['seconds']:.2f} s"
    if "growth_cuda" in run:
        text += f", CUDA growth {run['growth_cuda'] / MIB:.1f} MiB"
    return text


def summarise(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[0]["error"] if runs else "no runs"}
    out = {
        "runs": len(ok),
        "growth_mib": statistics.median(r["growth_rss"] for r in ok) / MIB,
        "peak_mib": statistics.median(r["peak_rss"] for r in ok) / MIB,
        "seconds": statistics.median(r["seconds"] for r in ok),
        "finite": all(r["finite"] for r in ok),
    }
    if "growth_cuda" in ok[0]:
        out["cuda_growth_mib"] = statistics.median(r["growth_cuda"] for r in ok) / MIB
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller model, one repeat (< 1 minute)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--libraries", default=",".join(LIBRARIES))
    parser.add_argument("--depths", default="10,1000", help="comma list; the first and last are compared")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=256, help="MLP width (p = 74 x hidden + 10)")
    parser.add_argument("--n-test", type=int, default=8, help="right-hand sides solved together")
    parser.add_argument("--batch", type=int, default=32, help="LiSSA minibatch size")
    parser.add_argument("--damping", type=float, default=0.05)
    parser.add_argument("--epochs", type=int, default=30, help="Adam epochs to train the MLP")
    parser.add_argument("--tolerance-mib", type=float, default=16.0)
    parser.add_argument("--threads", type=int, default=None, help="OMP threads per worker")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per worker")
    parser.add_argument("--json", default=None, metavar="PATH")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--lib", help=argparse.SUPPRESS)
    parser.add_argument("--depth", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--state", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.quick:
        args.hidden, args.repeats, args.epochs = 64, 1, 10
        args.depths = "10,300"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda given but CUDA is not available")
    depths = [int(d) for d in args.depths.split(",")]
    libs = [lib for lib in args.libraries.split(",") if lib]
    if unknown := set(libs) - set(LIBRARIES):
        parser.error(f"unknown libraries {sorted(unknown)} (captum has no LiSSA)")
    if "influencer" not in libs:
        libs.insert(0, "influencer")

    with tempfile.TemporaryDirectory() as tmp:
        state = os.path.join(tmp, "state.pt")
        problem = prepare_state(args, state)
        print(
            f"LiSSA peak memory: digits MLP 64-{args.hidden}-10 tanh float64 (p={problem['num_params']}), "
            f"{args.n_test} right-hand sides, batch={args.batch}, damping={args.damping:g}, "
            f"scale={problem['scale']:.4g}, device={args.device}, {args.repeats} fresh process(es) each",
            flush=True,
        )
        summary: dict[str, dict[int, dict]] = {}
        for lib in libs:
            summary[lib] = {}
            for depth in depths:
                runs = []
                for k in range(args.repeats):
                    runs.append(measure(args, lib, depth, state))
                    print(f"  {lib} depth={depth} run {k + 1}: {describe(runs[-1])}", flush=True)
                summary[lib][depth] = {**summarise(runs), "raw": runs}

    lo, hi = depths[0], depths[-1]
    rows = []
    for lib in libs:
        for depth in depths:
            s = summary[lib][depth]
            if "error" in s:
                rows.append([lib, depth, None, None, None, None, None, "error: " + s["error"][:70]])
                continue
            ratio = None
            if depth == hi and "error" not in summary[lib][lo]:
                ratio = s["peak_mib"] / summary[lib][lo]["peak_mib"]
            note = "" if s["finite"] else "non-finite result"
            cuda = s.get("cuda_growth_mib")
            rows.append([lib, depth, s["seconds"], s["peak_mib"], s["growth_mib"], cuda, ratio, note])
    header = [
        "library",
        "depth",
        "solve_s",
        "peak_rss_MiB",
        "growth_MiB",
        "cuda_growth_MiB",
        "peak_ratio",
        "note",
    ]
    print(format_table(rows, header, align="lrrrrrrl"))

    ours = summary["influencer"]
    failed = "error" in ours[lo] or "error" in ours[hi]
    verdict = "could not be measured"
    if not failed:
        extra = ours[hi]["growth_mib"] - ours[lo]["growth_mib"]
        if "cuda_growth_mib" in ours[hi]:
            extra = max(extra, ours[hi]["cuda_growth_mib"] - ours[lo]["cuda_growth_mib"])
        failed = extra > args.tolerance_mib
        verdict = (
            f"influencer: depth {hi} uses {extra:+.1f} MiB vs depth {lo} "
            f"(tolerance {args.tolerance_mib:g} MiB): {'FAIL' if failed else 'ok'}"
        )
    print(verdict)
    if args.json:
        write_json(
            args.json,
            {
                "machine": machine(torch.device(args.device)),
                "versions": versions(("influencer", "torch", "dattri", "pyDVL")),
                "settings": {
                    k: v for k, v in vars(args).items() if k not in ("worker", "lib", "depth", "state")
                },
                "problem": problem,
                "results": {lib: {str(d): v for d, v in by.items()} for lib, by in summary.items()},
                "verdict": verdict,
                "failed": failed,
            },
        )
        print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
