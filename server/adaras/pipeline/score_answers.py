"""Score one eval arm's answers by every failure score, with the knobs a
validation split fixed (`pipeline.knobs`), so a held-out measurement applies
its registration as written:

    python3 -m adaras.pipeline.score_answers STAGE_DIR --knobs knobs.json \
        [--arm baseline] [--out DIR]

reads STAGE_DIR/generations.jsonl(.gz) (answers from `eval --answer-probe
--logprobs 20`) and writes DIR/answer-scores.json and one reliability diagram
per probability (DIR/reliability-<name>.png). Scores: the answer head's p_fail
raw and calibrated (its Platt map from the knobs), the combined score when the
knobs say it earned its place, every logprob score (`adaras.confidence`) with
the knobs' window and tail, and length. Each: AUROC with a bootstrap CI and
selective accuracy at 50/70/90% coverage; each probability also its Brier, ECE
(10 equal-width bins) and calibration slope with CIs; and the calibrated
probe's paired AUROC gain over the registered best logprob score (the
knobs' `best_logprob_score`, chosen on validation) and over the best one here.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import numpy as np

from adaras import confidence
from adaras.pipeline.grade import counts_as_correct
from adaras.pipeline.stats import (
    MAX_SCORE_RESAMPLES,
    brier,
    calibration_slope,
    score_heads,
    selective_accuracy,
)

LOGPROB_SCORES = ("mean_logprob", "conf_mean", "conf_lowest_group", "conf_bottom10",
                  "conf_tail", "self_certainty")


def read_rows(stage: Path) -> list[dict]:
    plain, packed = stage / "generations.jsonl", stage / "generations.jsonl.gz"
    if plain.exists():
        return [json.loads(x) for x in plain.read_text().splitlines() if x.strip()]
    with gzip.open(packed, "rt") as f:
        return [json.loads(x) for x in f if x.strip()]


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def scores_of(rows: list[dict], knobs: dict) -> dict[str, np.ndarray]:
    """Every failure score of each answer (rows that the head read)."""
    k = confidence.Knobs(window=int(knobs["window"]), tail=int(knobs["tail"]),
                         bottom_fraction=float(knobs.get("bottom_fraction", 0.1)))
    raw = np.array([r["steering"]["answer_failure_probability"] for r in rows], dtype=float)
    m = knobs["calibration"]["answer"]
    out = {"probe_raw": raw, "probe": sigmoid(m["a"] * logit(raw) + m["b"])}
    per = [confidence.trace_scores(r["confidence"], k) for r in rows]
    for name in (*LOGPROB_SCORES, "length"):
        out[name] = np.array([s[name] for s in per], dtype=float)
    c = knobs.get("combined") or {}
    if c.get("earns_its_place"):
        # the inputs as knobs.py fit them: the probe's raw logit first
        X = np.column_stack([logit(raw), *[out[n] for n in LOGPROB_SCORES],
                             np.log1p(out["length"])])
        z = (X - np.array(c["mean"])) / np.array(c["scale"])
        out["combined"] = sigmoid(z @ np.array(c["coef"]) + c["intercept"])
    return out


def reliability_png(wrong: np.ndarray, p: np.ndarray, name: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from adaras.pipeline.stats import expected_calibration_error

    cal = expected_calibration_error(wrong.astype(float), p)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--")
    if cal["bins"]:
        conf, rate, n = zip(*cal["bins"])
        ax.scatter(conf, rate, s=[10 + 2 * c for c in n], zorder=3)
        ax.plot(conf, rate)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted failure probability",
           ylabel="observed failure rate",
           title=f"{name}: ECE {cal['ece']:.3f} (n = {wrong.size})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def score_answers(stage: Path, knobs: dict, arm: str = "baseline", out: Path | None = None,
                  seed: int = 0, n: int = MAX_SCORE_RESAMPLES) -> dict:
    rows = [r for r in read_rows(stage) if r["config"] == arm
            and (r.get("steering") or {}).get("answer_failure_probability") is not None
            and "confidence" in r]
    if not rows:
        raise ValueError(f"{stage}: no {arm} answer with the probe's p_fail and logprobs")
    wrong = np.array([not counts_as_correct(r) for r in rows])
    s = scores_of(rows, knobs)
    probabilities = [k for k in ("probe", "probe_raw", "combined") if k in s]
    rankings = [k for k in s if k not in probabilities]
    heads = score_heads(wrong, {k: s[k] for k in ("probe", *[p for p in probabilities
                                                             if p != "probe"], *rankings)},
                        seed, n, scores=tuple(rankings))
    result = {"arm": arm, "answers": len(rows), "failure_rate": float(wrong.mean()),
              "knobs": {k: knobs[k] for k in ("window", "tail", "best_logprob_score")},
              "scores": {}}
    for k in s:
        entry = {**heads[k], "selective_accuracy": selective_accuracy(wrong, s[k])}
        if k in probabilities:
            entry.update(brier=brier(wrong, s[k]), **calibration_slope(wrong, s[k], seed,
                                                                        min(n, 500)))
        result["scores"][k] = entry
    registered = knobs["best_logprob_score"]
    here = max(LOGPROB_SCORES, key=lambda k: result["scores"][k].get("auroc") or 0)
    result["probe_gain_over_registered_best"] = {
        "score": registered, "gain": heads[registered].get("gain"),
        "gain_ci95": heads[registered].get("gain_ci95")}
    result["probe_gain_over_best_here"] = {
        "score": here, "gain": heads[here].get("gain"), "gain_ci95": heads[here].get("gain_ci95")}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "answer-scores.json").write_text(json.dumps(result, indent=2) + "\n")
        for k in probabilities:
            reliability_png(wrong, s[k], k, out / f"reliability-{k}.png")
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python3 -m adaras.pipeline.score_answers",
                                 description=__doc__)
    ap.add_argument("stage", type=Path)
    ap.add_argument("--knobs", type=Path, required=True)
    ap.add_argument("--arm", default="baseline")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    result = score_answers(args.stage, json.loads(args.knobs.read_text()), args.arm,
                           args.out or args.stage)
    print(json.dumps({k: {m: v.get(m) for m in ("auroc", "auroc_ci95", "brier", "slope")}
                      for k, v in result["scores"].items()}, indent=2))
    return result


if __name__ == "__main__":
    main()
