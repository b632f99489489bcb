"""Fix every knob of a held-out answer-probe measurement on the validation
capture (`adaras capture-validation`), by the rules its registration wrote
down first, so that held-out answers choose none of them:

    python3 -m adaras.pipeline.knobs VALIDATION_DIR [--profile P --calibrated Q]

reads traces.jsonl(.gz) and prompts.jsonl and writes knobs.json: each head's
validation AUROC in the engine's dtype, its Platt map, DeepConf's window and
tail, the best logprob score, whether a combined score earns its place, the
early-stop bounds and DeepConf's online-stop threshold.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from adaras.confidence import Knobs, trace_scores

WINDOWS = (32, 64, 128, 256, 512, 1024, 2048)
LOGPROB_SCORES = ("mean_logprob", "conf_mean", "conf_lowest_group", "conf_bottom10",
                  "conf_tail", "self_certainty")
FINISH_PRECISION, ABORT_PRECISION, MIN_SUPPORT, MIN_ABORT_TOKENS = 0.8, 0.95, 10, 256


def read_rows(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def platt(logit: np.ndarray, y: np.ndarray) -> dict:
    """p = sigmoid(a * logit + b), fit by an unpenalized logistic regression."""
    lr = LogisticRegression(C=1e6, max_iter=10000).fit(logit.reshape(-1, 1), y)
    return {"a": float(lr.coef_[0, 0]), "b": float(lr.intercept_[0])}


def scores_at(rows: list[dict], knobs: Knobs) -> dict[str, np.ndarray]:
    per = [trace_scores(r["confidence"], knobs) for r in rows]
    return {k: np.array([s[k] for s in per]) for k in per[0]}


def best_knob(rows, y, score: str, field: str) -> int:
    """The window (or tail) with the highest validation AUROC of `score`, ties to the longer."""
    aucs = {w: roc_auc_score(y, scores_at(rows, Knobs(**{field: w}))[score]) for w in WINDOWS}
    return max(WINDOWS, key=lambda w: (round(aucs[w], 12), w))


def finish_bound(p: np.ndarray, y: np.ndarray) -> float | None:
    """The largest t with at least 80% right among the traces below t (>= 10 of them)."""
    best = None
    for t in np.unique(p):
        below = p < t
        if below.sum() >= MIN_SUPPORT and (1 - y[below]).mean() >= FINISH_PRECISION:
            best = float(t)
    return best


def abort_bound(running: list[tuple[int, float, int]]) -> float | None:
    """The smallest t with at least 95% wrong among the readings above t (>= 10),
    over every running reading taken after at least 256 answer tokens."""
    pts = [(p, y) for tokens, p, y in running if tokens >= MIN_ABORT_TOKENS]
    if not pts:
        return None
    p = np.array([a for a, _ in pts])
    y = np.array([b for _, b in pts])
    for t in np.sort(np.unique(p)):
        above = p > t
        if above.sum() >= MIN_SUPPORT and y[above].mean() >= ABORT_PRECISION:
            return float(t)
    return None


def fix_knobs(folder: Path) -> dict:
    traces_path = folder / "traces.jsonl"
    rows = read_rows(traces_path if traces_path.exists() else folder / "traces.jsonl.gz")
    prompts = read_rows(folder / "prompts.jsonl")
    y = np.array([r["label"] for r in rows])
    logit = np.array([r["answer_logit"] for r in rows])
    py = np.array([r["label"] for r in prompts])
    plogit = np.array([r["prompt_logit"] for r in prompts])
    answer_map, prompt_map = platt(logit, y), platt(plogit, py)

    window = best_knob(rows, y, "conf_lowest_group", "window")
    tail = best_knob(rows, y, "conf_tail", "tail")
    knobs = Knobs(window=window, tail=tail)
    s = scores_at(rows, knobs)
    aurocs = {k: float(roc_auc_score(y, s[k])) for k in (*LOGPROB_SCORES, "length")}
    best = max(LOGPROB_SCORES, key=lambda k: aurocs[k])

    # the combined score, cross-validated by problem on validation (it is fit there)
    X = np.column_stack([logit, *[s[k] for k in LOGPROB_SCORES], np.log1p(s["length"])])
    groups = np.array([r["problem"] for r in rows])
    cv = np.zeros(len(rows))
    for tr, te in GroupKFold(n_splits=5).split(X, y, groups):
        m = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=10000))
        cv[te] = m.fit(X[tr], y[tr]).predict_proba(X[te])[:, 1]
    combined_cv = float(roc_auc_score(y, cv))
    full = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=10000)).fit(X, y)
    probe_auroc = float(roc_auc_score(y, logit))
    earns = combined_cv > probe_auroc and combined_cv > aurocs[best]

    p_cal = sigmoid(answer_map["a"] * logit + answer_map["b"])
    running = [(64 * (i + 1), float(sigmoid(answer_map["a"] * v + answer_map["b"])), r["label"])
               for r in rows for i, v in enumerate(r.get("running_logits", []))]
    g = np.array([-scores_at([r], knobs)["conf_lowest_group"][0] for r in rows])  # confidence
    online = float(np.percentile(g[y == 0], 10)) if (y == 0).any() else None

    scaler, lr = full.named_steps["standardscaler"], full.named_steps["logisticregression"]
    return {
        "validation": {"traces": len(rows), "problems": len(set(groups)),
                       "prompts": len(prompts), "failure_rate": float(y.mean()),
                       "prompt_failure_rate": float(py.mean())},
        "heads_auroc_validation": {"answer": probe_auroc,
                                   "prompt": float(roc_auc_score(py, plogit))},
        "calibration": {"answer": answer_map, "prompt": prompt_map,
                        "rule": "Platt on the validation split, folded as an affine map of "
                                "the head's last logit"},
        "window": window, "tail": tail, "bottom_fraction": knobs.bottom_fraction,
        "logprob_aurocs_validation": aurocs, "best_logprob_score": best,
        "combined": {"inputs": ["probe_logit", *LOGPROB_SCORES, "log1p_length"],
                     "cv_auroc_validation": combined_cv, "earns_its_place": bool(earns),
                     "mean": scaler.mean_.tolist(), "scale": scaler.scale_.tolist(),
                     "coef": lr.coef_[0].tolist(), "intercept": float(lr.intercept_[0])},
        "early_stop": {"finish_below": finish_bound(p_cal, y),
                       "abort_above": abort_bound(running),
                       "abort_after_tokens": MIN_ABORT_TOKENS, "reading_every": 64},
        "deepconf": {"online_stop_below_group_confidence": online,
                     "filter_at_n4": {"high": "keep all 4: a vote weighted by the best "
                                              "group-based confidence",
                                      "low": "keep 1: the most confident sample"},
                     "ties": "larger total weight, then the earliest sample; majority "
                             "vote ties to the earliest sample"},
    }


@torch.no_grad()
def fold(head, a: float, b: float) -> None:
    """Make the head's logit a * logit + b in place (its last layer is affine)."""
    head.fc2.weight.mul_(a)
    head.fc2.bias.mul_(a).add_(b)


def calibrate(profile, calibration: dict, source: str):
    """The profile with each head's Platt map folded into its last layer, the
    prompt head's threshold mapped through the same map (so the gate fires on
    the same prompts), and the provenance saying on which data it was fit."""
    maps = {"answer": calibration["answer"], "prompt": calibration["prompt"]}
    for name, m in maps.items():
        if m["a"] <= 0:
            raise ValueError(f"the {name} head's Platt slope is {m['a']:.3g}: a map that does "
                             "not keep its ranking is no calibration; not folded")
    if profile.answer_predictor is not None:
        fold(profile.answer_predictor, maps["answer"]["a"], maps["answer"]["b"])
    if profile.predictor is not None:
        m = maps["prompt"]
        fold(profile.predictor, m["a"], m["b"])
        if profile.threshold is not None:
            t = min(max(profile.threshold, 1e-12), 1 - 1e-12)
            profile.threshold = float(sigmoid(m["a"] * np.log(t / (1 - t)) + m["b"]))
    profile.provenance = {**profile.provenance, "calibration": {
        "method": "Platt (logistic regression of the label on the head's raw logit), folded "
                  "into each head's last layer; the threshold mapped through the prompt map",
        "fit_on": source, "answer": maps["answer"], "prompt": maps["prompt"]}}
    return profile


def main(argv: list[str] | None = None) -> dict:
    import argparse

    from adaras.profile import SteeringProfile

    ap = argparse.ArgumentParser(prog="python3 -m adaras.pipeline.knobs", description=__doc__)
    ap.add_argument("validation", type=Path, help="capture-validation's folder")
    ap.add_argument("--out", type=Path, help="knobs.json (default: in the folder)")
    ap.add_argument("--profile", help="a profile to calibrate with the fitted maps")
    ap.add_argument("--calibrated", type=Path, help="where the calibrated profile goes")
    args = ap.parse_args(argv)
    result = fix_knobs(args.validation)
    (args.out or args.validation / "knobs.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.profile:
        prof = calibrate(SteeringProfile.load(args.profile), result["calibration"],
                         f"{args.validation} (the heads' validation split, teacher-forced)")
        prof.save(args.calibrated or args.validation / "profile-calibrated.safetensors")
    print(json.dumps({k: result[k] for k in ("heads_auroc_validation", "calibration", "window",
                                             "tail", "best_logprob_score", "early_stop")},
                     indent=2))
    return result


if __name__ == "__main__":
    main()
