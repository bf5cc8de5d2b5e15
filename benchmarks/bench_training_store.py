"""The cost of collecting a gradient store during training (``influencer.index.TrainingStore``).

Two models, each trained with a plain PyTorch loop: the digits CNN (``SmallCNN``, 1,348 training
images 8 x 8, Adam, batch 64 as in the ``influencer explain`` digits job) and a tiny GPT-2 (4
layers, width 128, 1,024 sequences of 64 tokens from a random bigram table, AdamW, batch 16, the
model's own token-mean loss). Two identical copies of each are trained side by side, step by step
in turn on the same batches, so that both see the same machine load: one plainly, one collecting a
store in every epoch (a window opened at the epoch's first step, so each epoch writes one complete
store: the window's set-up, the hooks of every step, the chunks and manifest; the first window also
checks its first batch; the writer thread hashes the model's classes and the data with the first
store's weights, the weights only in later ones).
After a warm-up epoch, ``--repeats`` epochs; the table reports the median epoch (the sum of its
steps' times) of each copy and:

* ``per_epoch``: collecting epoch / plain epoch, the overhead when every epoch is a checkpoint;
* ``schedule``: the overhead of ``--checkpoints`` stores over ``--epochs`` epochs of training,
  ``1 + C (collect - plain) / (E plain)``, the usual use (a few checkpoints of a longer run).

Steps of two models in turn evict each other's data from the caches, which a training run of one
model does not: for small models the collecting copy, with more data per step, loses more to that.
So ``--epoch-repeats`` more epochs follow, whole epochs of each copy in turn (plain, collecting,
...), each collecting epoch waiting at its end for its store's files (written beside training);
``whole epochs`` is the ``schedule`` from their median wall times, ``(CPU time)`` from their CPU
time of the process, every thread included.

Both estimate a training run from epochs. ``--runs`` measures the thing itself: whole training runs
of ``--epochs`` epochs, each copy in turn (which goes first alternates, and the copies take turns
at collecting, every other pair of runs: two identical copies differ in speed by a few percent),
the collecting one with a new store of ``--checkpoints`` evenly spaced windows, timed until
``finish()`` returns with every file on disk. Everything a user's run pays is in it: the first
window's check and fingerprint (the model classes' source read as in a fresh process, in the
writer thread), each
window's set-up, steps and files, and what the file writing beside training takes from the steps
after it. ``training runs`` is the median over the runs of collecting run / its neighbouring plain
run, in wall time and in CPU time of the process. Each step is timed too: ``breakdown_ms`` sums,
over the steps of each kind (a window's first step, its other steps, the 3 after it closes, the
rest), the median over the runs of the collecting run's step time minus the plain run's, and adds
``finish()``.

The projection is Kronecker ``--k x --k`` per layer, random basis (a PCA basis adds its fit, a
forward and backward pass over ``pca_examples`` examples, per checkpoint), float32 storage, no
Fisher (TracIn-style queries need none)::

    python benchmarks/bench_training_store.py --threads 1 --json out/training_store.json
"""

from __future__ import annotations

import argparse
import contextlib
import linecache
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from common import format_table, machine, versions, write_json


def digits_cnn() -> dict[str, Any]:
    from influencer import ClassificationTask
    from influencer.datasets import load_digits
    from influencer.models import SmallCNN

    split = load_digits(images=True, seed=0)
    torch.manual_seed(0)
    model = SmallCNN(10, 16)
    task = ClassificationTask(weight_decay=1e-3)
    x, y = split.x_train.float(), split.y_train
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def loss(ids: torch.Tensor) -> torch.Tensor:
        batch = (x[ids], y[ids])
        return task.loss(model, batch).mean() + task.regularizer(dict(model.named_parameters()))

    return {
        "name": "digits-cnn",
        "model": model,
        "task": task,
        "data": (x, y),
        "n": len(x),
        "batch": 64,
        "opt": opt,
        "loss": loss,
        "scale": "mean",
        "params": None,
    }


def tiny_gpt2() -> dict[str, Any]:
    from transformers import GPT2Config, GPT2LMHeadModel

    from influencer.tasks.huggingface import CausalLMTask

    torch.manual_seed(0)
    n, t, vocab = 1024, 64, 512
    config = GPT2Config(
        vocab_size=vocab, n_positions=t, n_embd=128, n_layer=4, n_head=4, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = GPT2LMHeadModel(config)
    # tokens from a random bigram table, so there is something to learn
    gen = torch.Generator().manual_seed(0)
    table = torch.randint(0, vocab, (vocab, 4), generator=gen)
    tokens = torch.empty(n, t, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, vocab, (n,), generator=gen)
    for i in range(1, t):
        tokens[:, i] = table[tokens[:, i - 1], torch.randint(0, 4, (n,), generator=gen)]
    data = {"input_ids": tokens, "attention_mask": torch.ones_like(tokens), "labels": tokens.clone()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    params = [name for name, _ in model.named_parameters() if name.endswith(("c_attn.weight", "c_attn.bias",
              "c_proj.weight", "c_proj.bias", "c_fc.weight", "c_fc.bias"))]  # fmt: skip

    def loss(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=tokens[ids], labels=tokens[ids]).loss  # mean over the batch's tokens

    batch = 16
    return {
        "name": "gpt2-tiny",
        "model": model,
        "task": CausalLMTask(),
        "data": data,
        "n": n,
        "batch": batch,
        "opt": opt,
        "loss": loss,
        "scale": float(batch * (t - 1)),  # the loss divides the summed token losses by this
        "params": params,
    }


PROBLEMS = {"digits-cnn": digits_cnn, "gpt2-tiny": tiny_gpt2}


def step(problem: dict[str, Any], ids: torch.Tensor, store: Any) -> float:
    """One training step (wrapped in ``store.step`` when a store is given); seconds."""
    opt = problem["opt"]
    start = time.perf_counter()
    ctx = store.step(ids, lr=opt.param_groups[0]["lr"]) if store is not None else contextlib.nullcontext()
    with ctx:
        loss = problem["loss"](ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
    opt.step()
    return time.perf_counter() - start


@contextlib.contextmanager
def clocked(record: dict[str, list[float]], kind: str) -> Iterator[None]:
    """Append the block's wall seconds to ``record[kind]`` and its process CPU seconds (every
    thread) to ``record[kind + "_cpu"]``."""
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    record[kind].append(time.perf_counter() - wall)
    record[kind + "_cpu"].append(time.process_time() - cpu)


def store_settings(
    args: argparse.Namespace, problem: dict[str, Any], projector: Any, checkpoints: tuple[int, ...]
) -> Any:
    """The collecting copy's :class:`TrainingStoreSettings` (``--hold-mb``, ``--no-spare-core``)."""
    from influencer.index import TrainingStoreSettings

    return TrainingStoreSettings(
        checkpoints=checkpoints,
        projector=projector,
        loss_scale=problem["scale"],
        hold_mb=args.hold_mb,
        spare_core=not args.no_spare_core,
    )


def training_runs(
    args: argparse.Namespace,
    plain_problem: dict[str, Any],
    problem: dict[str, Any],
    projector: Any,
    steps: int,
    gen: torch.Generator,
    tmp: Path,
) -> dict[str, list[float]]:
    """``--runs`` whole training runs of each copy in turn (taking turns at collecting): ``--epochs``
    epochs, the collecting copy with a new :class:`TrainingStore` of ``--checkpoints`` evenly spaced
    windows (the first at step 0), timed until ``finish()`` returns (every store on disk): wall and
    process CPU time."""
    from influencer._kernel import fingerprint
    from influencer.index import TrainingStore

    c, e = args.checkpoints, args.epochs
    checkpoints = tuple(sorted({(i * e // c) * steps for i in range(c)}))
    out: dict[str, Any] = {"plain": [], "collect": [], "plain_cpu": [], "collect_cpu": []}
    out |= {"steps_plain": [], "steps_collect": [], "finish_collect": [], "checkpoints": list(checkpoints)}
    for r in range(args.runs):
        orders = [torch.randperm(problem["n"], generator=gen) for _ in range(e)]
        # the two copies of the model differ in speed by a few percent (where their memory lies; the
        # same loop on both, no store: 0.95-0.99), so they take turns at collecting, every other pair
        # of runs; and ABBA: the machine's speed drifts over seconds, so which kind goes first alternates
        first, second = (plain_problem, problem) if r % 4 < 2 else (problem, plain_problem)
        kinds = (("plain", first), ("collect", second))
        for kind, copy in kinds if r % 2 == 0 else kinds[::-1]:
            with clocked(out, kind):
                store = None
                if kind == "collect":
                    # each run pays what a fresh process pays: the model classes' files are read again
                    fingerprint._CLASS_SPANS.clear()
                    linecache.clearcache()
                    settings = store_settings(args, problem, projector, checkpoints)
                    data, params = copy["data"], copy["params"]
                    store = TrainingStore(
                        copy["model"], copy["task"], data, tmp / f"run-{r}", settings, params=params
                    )
                times = [step(copy, ids, store) for order in orders for ids in order.split(problem["batch"])]
                out["steps_" + kind].append(times)
                if store is not None:
                    start = time.perf_counter()
                    assert len(store.finish()) == len(checkpoints)
                    out["finish_collect"].append(time.perf_counter() - start)
    return out


def breakdown(runs: dict[str, Any], steps: int) -> dict[str, float]:
    """Where a collecting run's extra time goes: per step, the median over the runs of each copy's
    time, summed over the steps of each kind, collecting minus plain, in ms. The kinds: a window's
    first step (its set-up; the first window's also hashes the model's classes and checks the
    batch), the window's other steps (hooks, projections, products), the 3 steps after each window
    closes (its store is scaled, checked and written beside them), every other step; and
    ``finish()`` (waiting for the last store's files)."""
    plain = [statistics.median(s) for s in zip(*runs["steps_plain"], strict=True)]
    collect = [statistics.median(s) for s in zip(*runs["steps_collect"], strict=True)]
    kinds = ["window first steps", "window other steps", "3 steps after each window", "other steps"]
    kind = [3] * len(plain)
    for c in runs["checkpoints"]:
        kind[c] = 0
        for j in range(c + 1, min(c + steps, len(kind))):
            kind[j] = 1
        for j in range(c + steps, min(c + steps + 3, len(kind))):
            kind[j] = 2
    out = {name: 0.0 for name in kinds}
    for k, p, c in zip(kind, plain, collect, strict=True):
        out[kinds[k]] += 1000 * (c - p)
    out["finish"] = 1000 * statistics.median(runs["finish_collect"])
    out["total"] = sum(out.values())
    out["plain run"] = 1000 * sum(plain)
    return out


def run(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Two identical copies of the problem, one trained plainly and one collecting, step by step in
    turn, so that both see the same machine load; per epoch the sum of each copy's step times.
    Then ``--epoch-repeats`` whole epochs of each copy in turn (see the module docstring)."""
    from influencer.index import KroneckerProjector, TrainingStore

    plain_problem, problem = PROBLEMS[name](), PROBLEMS[name]()
    for p in (plain_problem, problem):
        p["model"].train()
    projector = KroneckerProjector(k_in=args.k, k_out=args.k, basis=args.basis)
    steps = -(-problem["n"] // problem["batch"])  # per epoch
    epochs = 1 + args.repeats + args.epoch_repeats
    checkpoints = tuple(range(0, epochs * steps, steps))  # every epoch but the warm-up
    settings = store_settings(args, problem, projector, checkpoints[1:])
    gen = torch.Generator().manual_seed(0)
    plain, collect = [], []
    whole: dict[str, list[float]] = {"plain": [], "collect": [], "plain_cpu": [], "collect_cpu": []}
    with tempfile.TemporaryDirectory() as tmp:
        store = TrainingStore(
            problem["model"], problem["task"], problem["data"], Path(tmp), settings, params=problem["params"]
        )
        for r in range(1 + args.repeats):  # the first epoch warms up (allocator, first calls)
            order = torch.randperm(problem["n"], generator=gen)
            times = [0.0, 0.0]
            for ids in order.split(problem["batch"]):
                times[0] += step(plain_problem, ids, None)
                times[1] += step(problem, ids, store)
            if r:
                plain.append(times[0])
                collect.append(times[1])
        for _ in range(args.epoch_repeats):
            order = torch.randperm(problem["n"], generator=gen)
            store.flush()
            for kind, copy in (("plain", plain_problem), ("collect", problem)):
                with clocked(whole, kind):
                    for ids in order.split(problem["batch"]):
                        step(copy, ids, store if kind == "collect" else None)
                    if kind == "collect":
                        store.flush()  # its store's files, written beside training, counted here
        assert len(store.finish()) == args.repeats + args.epoch_repeats
        runs = training_runs(args, plain_problem, problem, projector, steps, gen, Path(tmp))

    def overhead(plain_s: float, collect_s: float) -> dict[str, float]:
        c, e = args.checkpoints, args.epochs
        return {"per_epoch": collect_s / plain_s, "schedule": 1 + c * (collect_s - plain_s) / (e * plain_s)}

    p, c = statistics.median(plain), statistics.median(collect)
    out: dict[str, Any] = {
        "problem": name,
        "n": problem["n"],
        "batch": problem["batch"],
        "k_per_layer": args.k,
        "hold_mb": args.hold_mb,
        "spare_core": not args.no_spare_core,
        "plain_s": p,
        "collect_s": c,
        **overhead(p, c),
        "plain_all": plain,
        "collect_all": collect,
    }
    if args.runs:
        m = {k: statistics.median(runs[k]) for k in ("plain", "collect", "plain_cpu", "collect_cpu")}
        # each run's ratio to its neighbour of the other kind, then the median over the runs
        ratios = {
            clock: [c / p for p, c in zip(runs["plain" + clock], runs["collect" + clock], strict=True)]
            for clock in ("", "_cpu")
        }
        out["training_runs"] = {
            **{k + "_s": v for k, v in m.items()},
            "wall": statistics.median(ratios[""]),
            "cpu": statistics.median(ratios["_cpu"]),
            "ratios": ratios,
            "breakdown_ms": breakdown(runs, steps),
            "all": runs,
        }
    if args.epoch_repeats:
        m = {k: statistics.median(v) for k, v in whole.items()}
        wall, cpu = overhead(m["plain"], m["collect"]), overhead(m["plain_cpu"], m["collect_cpu"])
        out["whole_epochs"] = {**{k + "_s": v for k, v in m.items()}, "wall": wall, "cpu": cpu, "all": whole}
    return out


def main(argv: list[str] | None = None) -> int:
    from influencer.index import TrainingStoreSettings

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", default=",".join(PROBLEMS))
    parser.add_argument("--k", type=int, default=16, help="Kronecker k_in = k_out per layer")
    parser.add_argument("--basis", default="random", choices=("random", "pca"))
    parser.add_argument(
        "--hold-mb",
        type=float,
        default=TrainingStoreSettings.hold_mb,
        help="TrainingStoreSettings.hold_mb (0: every step projected in its backward pass)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="epochs of each kind (medians reported)")
    parser.add_argument(
        "--epoch-repeats", type=int, default=5, help="whole epochs of each kind in turn (medians)"
    )
    parser.add_argument(
        "--runs",
        type=int,
        default=0,
        help="whole training runs (--epochs, --checkpoints) of each kind, in turn",
    )
    parser.add_argument("--epochs", type=int, default=20, help="training epochs of the schedule column")
    parser.add_argument("--checkpoints", type=int, default=4, help="stores collected in the schedule column")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--no-spare-core",
        action="store_true",
        help="TrainingStoreSettings(spare_core=False): training keeps its threads while the writer works",
    )
    parser.add_argument("--json", default=None, metavar="PATH")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = {
        "machine": machine(torch.device("cpu")),
        "versions": versions(("influencer", "torch", "transformers")),
    }
    print("machine: " + ", ".join(f"{k}={v}" for k, v in env["machine"].items()), flush=True)
    rows = [run(name, args) for name in args.problems.split(",") if name]
    whole = args.epoch_repeats > 0
    table = [
        [r["problem"], r["n"], r["batch"], r["plain_s"], r["collect_s"], r["per_epoch"], r["schedule"]]
        + ([r["whole_epochs"]["wall"]["schedule"], r["whole_epochs"]["cpu"]["schedule"]] if whole else [])
        for r in rows
    ]
    sched = f"{args.checkpoints}/{args.epochs}"
    header = ["problem", "n", "batch", "plain_s", "collect_s", "per_epoch", f"schedule {sched}"]
    header += [f"whole epochs: schedule {sched}", f"(CPU time) {sched}"] if whole else []
    if args.runs:
        for r, t in zip(rows, table, strict=True):
            t += [r["training_runs"]["wall"], r["training_runs"]["cpu"]]
        header += [f"training runs {sched}: wall", "(CPU time)"]
    print(format_table(table, header, align="l" + "r" * (len(header) - 1)))
    for r in rows if args.runs else []:
        parts = ", ".join(f"{k} {v:.1f}" for k, v in r["training_runs"]["breakdown_ms"].items())
        print(f"{r['problem']}: a collecting run's extra ms, from per-step medians: {parts}")
    if args.json:
        write_json(args.json, {**env, "args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
