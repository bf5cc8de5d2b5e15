"""Which training sentences explain a small transformer's predictions? (Hugging Face BERT)

A tiny BERT (``transformers.BertForSequenceClassification`` built from a config, random init) is
trained from scratch on generated review sentences with a rule to learn: the sentiment of the
adjective, flipped by "not" (``the service was not very good today`` is negative). A fraction of
the training labels is flipped at random. The script then explains a few test predictions:

* **EK-FAC** over every Linear layer (``params="supported"``: attention, feed-forward, pooler, head;
  embeddings and LayerNorms are left out with a warning);
* **CG** with the Gauss-Newton curvature over the same parameters (the reference for EK-FAC);
* **CG** with the Gauss-Newton curvature over the head only (pooler + classifier).

and prints the most helpful and most harmful training sentences, how often a flipped label is
among the most harmful, and how well each estimate agrees with the reference. Batches are padded dicts
(``input_ids``, ``attention_mask``, ``labels``) as a tokenizer returns them; per-example gradients
run under ``vmap`` with the 4-D additive mask that ``SequenceClassificationTask`` builds.

    python -m reproductions.hf_text_influence  # under a minute on a CPU
    python -m reproductions.hf_text_influence --n-train 1000 --flip 0.1 --explain 5

Needs ``pip install 'influencer[hf]'`` (transformers).
"""

from __future__ import annotations

import argparse
import json
import random
import time
import warnings
from pathlib import Path

import torch

from influencer import CG, EKFAC, Influence, top_k
from influencer._kernel.stats import pearson, spearman
from influencer.tasks import SequenceClassificationTask, predictions
from influencer.training import train_minibatch

SUBJECTS = ["movie", "food", "service", "hotel", "book", "concert", "staff", "room", "music", "trip"]
VERBS = ["was", "is", "seemed", "felt"]
ADVERBS = ["very", "really", "quite", "so"]
POSITIVE = ["good", "great", "wonderful", "pleasant", "excellent", "lovely"]
NEGATIVE = ["bad", "awful", "terrible", "boring", "poor", "dreadful"]
TAILS = ["today", "overall", "again", "tonight"]
SPECIAL = ["[PAD]", "[CLS]", "[SEP]"]
WORDS = ["the", "not", *SUBJECTS, *VERBS, *ADVERBS, *POSITIVE, *NEGATIVE, *TAILS]
VOCAB = {w: i for i, w in enumerate([*SPECIAL, *WORDS])}


def sentence(rng: random.Random) -> tuple[str, int]:
    """A templated review and its true label (1 = positive): adjective sentiment XOR negation."""
    positive = rng.random() < 0.5
    negated = rng.random() < 0.4
    words = ["the", rng.choice(SUBJECTS), rng.choice(VERBS)]
    words += ["not"] if negated else []
    words += [rng.choice(ADVERBS)] if rng.random() < 0.5 else []
    words += [rng.choice(POSITIVE if positive else NEGATIVE)]
    words += [rng.choice(TAILS)] if rng.random() < 0.4 else []
    return " ".join(words), int(positive != negated)


def encode(sentences: list[str], labels: list[int]) -> dict[str, torch.Tensor]:
    """Word-level tokenisation, ``[CLS] ... [SEP]``, right-padded to the longest sentence."""
    ids = [[VOCAB["[CLS]"], *(VOCAB[w] for w in s.split()), VOCAB["[SEP]"]] for s in sentences]
    width = max(len(x) for x in ids)
    input_ids = torch.tensor([x + [VOCAB["[PAD]"]] * (width - len(x)) for x in ids])
    return {
        "input_ids": input_ids,
        "attention_mask": (input_ids != VOCAB["[PAD]"]).long(),
        "labels": torch.tensor(labels),
    }


def make_data(n_train: int, n_test: int, flip: float, seed: int):
    rng = random.Random(seed)
    train = [sentence(rng) for _ in range(n_train)]
    test = [sentence(rng) for _ in range(n_test)]
    flipped = sorted(rng.sample(range(n_train), round(flip * n_train)))
    labels = [y for _, y in train]
    for i in flipped:
        labels[i] = 1 - labels[i]
    texts = [s for s, _ in train]
    return texts, encode(texts, labels), set(flipped), [s for s, _ in test], encode(*zip(*test, strict=True))


def build_model(seed: int):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
        num_labels=2,
        pad_token_id=VOCAB["[PAD]"],
    )
    return BertForSequenceClassification(config)


def show(title: str, scores: torch.Tensor, texts: list[str], labels: torch.Tensor, flipped: set[int], k: int):
    top = top_k(scores[None], k=k)
    print(f"  {title}")
    for kind, ids, values in (
        ("helpful", top.helpful_ids[0], top.helpful_scores[0]),
        ("harmful", top.harmful_ids[0], top.harmful_scores[0]),
    ):
        for i, v in zip(ids.tolist(), values.tolist(), strict=True):
            mark = "  <- flipped label" if i in flipped else ""
            label = "pos" if int(labels[i]) == 1 else "neg"
            print(f"    {kind} {v:+.2e}  [{label}] {texts[i]}{mark}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-train", type=int, default=600)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--flip", type=float, default=0.08, help="fraction of training labels flipped")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--explain", type=int, default=3, help="test predictions to explain")
    ap.add_argument("--top", type=int, default=3, help="training sentences shown per side")
    ap.add_argument("--weight-decay", type=float, default=0.0, help="L2 in the objective (Adam: keep tiny)")
    ap.add_argument("--damping", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None, help="cpu, cuda, ... (default: cpu)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op CPU threads (tiny model: 1 is fastest)")
    ap.add_argument("--out", type=Path, default=Path("out/hf_text_influence"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    texts, train, flipped, test_texts, test = make_data(args.n_train, args.n_test, args.flip, args.seed)
    task = SequenceClassificationTask(weight_decay=args.weight_decay)
    model = build_model(args.seed)
    start = time.time()
    history = train_minibatch(
        model, task, train, epochs=args.epochs, lr=2e-3, batch_size=32, seed=args.seed, device=args.device
    )
    train_seconds = time.time() - start
    pred = predictions(task, model, {k: v.to(next(model.parameters()).device) for k, v in test.items()}).cpu()
    accuracy = float((pred == test["labels"]).float().mean())
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"tiny BERT ({n_params} parameters), {args.n_train} training sentences ({len(flipped)} labels "
        f"flipped), trained {args.epochs} epochs in {train_seconds:.0f} s: final training loss "
        f"{history[-1]:.3f}, test accuracy {accuracy:.3f}"
    )

    # Explain the wrong predictions first, then the correct negated ones, then the rest.
    wrong = [i for i in range(len(test_texts)) if pred[i] != test["labels"][i]]
    negated = [i for i in range(len(test_texts)) if " not " in test_texts[i] and i not in wrong]
    rest = [i for i in range(len(test_texts)) if i not in wrong and i not in negated]
    chosen = (wrong + negated + rest)[: args.explain]
    explain = {k: v[chosen] for k, v in test.items()}

    runs = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        ekfac = Influence(
            model, task, train, estimator=EKFAC(damping=args.damping), params="supported", device=args.device
        )
    left_out = [str(w.message) for w in caught if "params='supported'" in str(w.message)]
    if left_out:
        print(f"EK-FAC: {left_out[0].split(': ', 1)[1][:160]}...")
    cg = CG(damping=args.damping, tol=1e-5)
    methods = {
        "EK-FAC, Linear layers": ekfac,
        "CG, Linear layers": Influence(
            model,
            task,
            train,
            estimator=cg,
            curvature="gauss_newton",
            params=ekfac.fn.names,
            device=args.device,
        ),
        "CG, head": Influence(
            model,
            task,
            train,
            estimator=cg,
            curvature="gauss_newton",
            params=["bert.pooler", "classifier"],
            device=args.device,
        ),
    }
    for name, inf in methods.items():
        start = time.time()
        scores = inf.fit().scores(explain).cpu()  # (explain, n_train); positive = helpful
        runs[name] = {"scores": scores, "seconds": time.time() - start, "p": inf.p}

    summary: dict = {"accuracy": accuracy, "flipped": len(flipped), "explained": [], "methods": {}}
    reference = runs["CG, Linear layers"]["scores"].flatten()
    k_harm = 10
    header = f"{'method':<22} {'p':>6} {'seconds':>8} {'Pearson':>8} {'Spearman':>9}"
    print(f"\n{header}  flipped in top-{k_harm} harmful")
    for name, run in runs.items():
        harmful = top_k(run["scores"], k=k_harm).harmful_ids
        rate = sum(int(i) in flipped for i in harmful.flatten().tolist()) / harmful.numel()
        r, rho = pearson(run["scores"].flatten(), reference), spearman(run["scores"].flatten(), reference)
        summary["methods"][name] = {
            "p": run["p"],
            "seconds": run["seconds"],
            "pearson_to_cg_linear": r,
            "spearman_to_cg_linear": rho,
            "flipped_in_top_harmful": rate,
        }
        print(f"{name:<22} {run['p']:>6} {run['seconds']:>8.1f} {r:>8.3f} {rho:>9.3f}  {rate:.0%}")
    base = len(flipped) / args.n_train
    print(f"(Pearson/Spearman: against CG over the Linear layers; flipped labels: {base:.0%} of all)")
    shown = {k: runs[k] for k in ("EK-FAC, Linear layers", "CG, head")}

    for row, i in enumerate(chosen):
        truth = "pos" if int(test["labels"][i]) == 1 else "neg"
        guess = "pos" if int(pred[i]) == 1 else "neg"
        print(f'\ntest: "{test_texts[i]}"  true {truth}, predicted {guess}')
        for name, run in shown.items():
            show(name, run["scores"][row], texts, train["labels"], flipped, args.top)
        summary["explained"].append({"text": test_texts[i], "label": truth, "predicted": guess})

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nsaved {args.out / 'summary.json'}")


if __name__ == "__main__":
    main()
