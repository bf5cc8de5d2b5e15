"""The race's ratio table from ``bench_estimators.py --json`` files: one row per (method, problem, tests).

Each row: our fit and score seconds, the fastest peer's total and name, and that peer's time divided
by ours (above 1 = ours faster), with the peer's ``rel_ours`` (how closely it computes the same
approximation) so the ratio is read at equal accuracy. Where every peer ran past ``--timeout-s``, the
row shows the limit and the ratio as a lower bound (``>= ...``)::

    python benchmarks/ratios.py out/small_t10.json out/small_t100.json ...   # Markdown to stdout
"""

from __future__ import annotations

import argparse
import json

LABELS = {
    "exact": "Exact",
    "cg": "CG",
    "lissa": "LiSSA",
    "arnoldi": "Arnoldi",
    "kfac": "K-FAC",
    "ekfac": "EK-FAC",
    "ekfac-emp": "EK-FAC (empirical Fisher)",
    "identity": "gradient dot product",
    "identity-proj": "projected gradient store",
}


def _seconds(x: float) -> str:
    return f"{x:.3g} s"


def rows_of(payload: dict) -> list[tuple]:
    out = []
    for problem in payload["problems"]:
        by_method: dict[str, list[dict]] = {}
        for row in problem["rows"]:
            if row["status"] in ("ok", "timeout"):
                by_method.setdefault(row["method"], []).append(row)
        for method, rows in by_method.items():
            ours = next((r for r in rows if r["library"] == "influencer" and r["status"] == "ok"), None)
            if ours is None:
                continue
            peers = [r for r in rows if r["library"] != "influencer" and r["status"] == "ok"]
            # A peer stopped at the limit is slower than every peer that finished.
            slow = [r for r in rows if r["library"] != "influencer" and r["status"] == "timeout"]
            best = min(peers, key=lambda r: r["seconds"]) if peers else None
            bound = "" if best is not None or not slow else ">= "
            over = "> " if bound else ""
            best = best or (slow[0] if slow else None)
            size = f"{problem['spec']['name']} (n = {problem['n_train']:,}, p = {problem['num_params']:,})"
            out.append(
                (
                    LABELS.get(method, method),
                    size,
                    problem["n_test"],
                    _seconds(ours["fit_seconds"]),
                    _seconds(ours["score_seconds"]),
                    _seconds(ours["seconds"]),
                    f"{best['library']} {over}{_seconds(best['seconds'])}" if best else "no peer",
                    f"**{bound}{best['seconds'] / ours['seconds']:.2f}x**" if best else "",
                    f"{best['rel_ours']:.2g}" if best and best.get("rel_ours") is not None else "",
                )
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="bench_estimators.py --json outputs")
    args = parser.parse_args()
    rows = []
    for path in args.files:
        with open(path) as f:
            rows += rows_of(json.load(f))
    order = list(LABELS.values())
    rows.sort(key=lambda r: (order.index(r[0]) if r[0] in order else len(order), r[1], r[2]))
    header = (
        "method",
        "problem",
        "tests",
        "ours fit",
        "ours score",
        "ours total",
        "fastest peer",
        "ratio",
        "rel_ours",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")


if __name__ == "__main__":
    main()
