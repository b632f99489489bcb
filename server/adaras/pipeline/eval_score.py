"""`adaras eval`, score: every config against the baseline (accuracy with
Wilson CIs, the paired difference with its bootstrap CI, exact McNemar, flips,
truncations, the MDE), the gate's numbers, the answer probe beside the free
baselines and the logprob confidences, the alpha screen; outcomes.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from adaras import confidence
from adaras.pipeline.eval_args import MODES, EvalArgs
from adaras.pipeline.eval_generate import config_problems
from adaras.pipeline.grade import counts_as_correct, is_cut
from adaras.pipeline.run import read_jsonl
from adaras.pipeline.stats import (
    MAX_SCORE_RESAMPLES,
    brier,
    calibration_slope,
    mcnemar_p,
    min_detectable_effect,
    paired_bootstrap,
    score_heads,
    selective_accuracy,
    wilson_ci,
    youden_threshold,
)


def write_outcomes(out: Path, rows: list[dict], configs) -> None:
    """outcomes.jsonl: one compact line per (config, problem) in config order."""
    lines = []
    for r in sorted(rows, key=lambda r: (config_order(r["config"]), r["problem"])):
        if r["config"] not in configs:
            continue
        rep = r.get("steering") or {}
        lines.append({"problem": r["problem"], "arm": r["config"], "correct": r["correct"],
                      "truncated": is_cut(r), "tokens": r["tokens"],
                      "p_fail": rep.get("failure_probability"),
                      "applied": rep.get("applied"),
                      **({"answer_p_fail": rep["answer_failure_probability"]}
                         if "answer_failure_probability" in rep else {})})
    tmp = out / "outcomes.jsonl.tmp"
    tmp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    tmp.replace(out / "outcomes.jsonl")


def summarize(out: Path, problems, configs, args: EvalArgs,
              keep: set[str] | None = None) -> dict:
    """Every config's numbers against the baseline; with `keep`, on those
    problems only (each arm's own problems, e.g. the noise arm's, intersected)."""
    rows = [{**r, "correct": counts_as_correct(r)}  # a cut answer counts as a failure
            for r in read_jsonl(out / "generations.jsonl")]
    ids = [p.id for p in problems if keep is None or p.id in keep]
    table = {(r["config"], r["problem"]): r for r in rows}
    write_outcomes(out, rows, configs)
    results = {"problems": len(ids), "configs": {}}
    # the prompt predictor's p_fail of each problem (a function of the prompt alone,
    # reported by the arms that run the gate), to set beside the answer probe's
    prompt_p = {r["problem"]: r["steering"]["failure_probability"] for r in rows
                if (r.get("steering") or {}).get("failure_probability") is not None}
    for name, steering in configs.items():
        arm = [p.id for p in config_problems(name, problems, args)]
        arm_set = set(arm)
        sub = [i for i in ids if i in arm_set]  # problem order, for pairing with baseline
        base = np.array([table[("baseline", i)]["correct"] for i in sub])
        base_answers = [table[("baseline", i)]["extracted"] for i in sub]
        got = [table[(name, i)] for i in sub]
        correct = np.array([r["correct"] for r in got])
        applied = [bool(r["steering"].get("applied")) for r in got if r["steering"]]
        vs = compare(table, sub, name, "baseline", args.bootstrap)
        entry = {
            "steering": steering, "problems": len(sub),
            "accuracy": float(correct.mean()),
            "accuracy_ci95": wilson_ci(int(correct.sum()), len(sub)),
            **{k: vs[k] for k in ("delta", "ci95", "mcnemar_p")},
            "fixed": vs["only_a"], "broken": vs["only_b"],
            # the final answer differs from the baseline's (not only its correctness)
            "changed": float(np.mean([r["extracted"] != b for r, b in zip(got, base_answers)])),
            "mean_tokens": float(np.mean([r["tokens"] for r in got])),
            "median_tokens": float(np.median([r["tokens"] for r in got])),
            "truncated": int(sum(is_cut(r) for r in got)),
        }
        discordant = (entry["fixed"] + entry["broken"]) / max(len(sub), 1)
        entry["mde80"] = min_detectable_effect(len(sub), discordant)
        if steering and steering["mode"] == "adaptive":
            entry["gate_rate"] = float(np.mean(applied)) if applied else 0.0
            p_fail = np.array([r["steering"].get("failure_probability") for r in got],
                              dtype=float)
            entry["threshold"] = got[0]["steering"].get("threshold")
            wrong = ~base
            gated = np.array(applied)
            prompt = score_heads(wrong, {"prompt": p_fail}, args.seed,
                                 min(args.bootstrap, MAX_SCORE_RESAMPLES))["prompt"]
            if wrong.any() and (~wrong).any():
                entry["gate_rate_on_baseline_wrong"] = float(gated[wrong].mean())
                entry["gate_rate_on_baseline_right"] = float(gated[~wrong].mean())
                entry["predictor_auroc"] = prompt["auroc"]
                entry["predictor_auroc_ci95"] = prompt["auroc_ci95"]
                # the cut a later stage can take from this one (threshold chosen on dev)
                entry["youden_threshold"] = youden_threshold(wrong.astype(int), p_fail)
            entry["calibration"] = prompt["calibration"]
            entry["calibration_ece_ci95"] = prompt.get("ece_ci95")
        if steering and steering.get("answer_probe"):
            entry["answer_probe"] = answer_probe_metrics(
                got, correct, args.seed,
                np.array([prompt_p.get(i, np.nan) for i in sub], dtype=float)
                if prompt_p else None, n=min(args.bootstrap, MAX_SCORE_RESAMPLES),
                knobs=read_knobs(args.knobs))
        results["configs"][name] = entry
    if args.secondary:
        a, b = args.secondary.split(",")
        results["secondary"] = compare(table, ids, a, b, args.bootstrap)
    return results


def compare(table: dict, ids: list[str], a: str, b: str, bootstrap: int) -> dict:
    """Config `a` against config `b`, paired on the problems both ran: the
    accuracy difference a - b, its paired bootstrap CI and the exact McNemar p."""
    both = [i for i in ids if (a, i) in table and (b, i) in table]
    ca = np.array([table[(a, i)]["correct"] for i in both], dtype=bool)
    cb = np.array([table[(b, i)]["correct"] for i in both], dtype=bool)
    return {"configs": [a, b], "problems": len(both),
            "accuracy": [float(ca.mean()), float(cb.mean())],
            "delta": float(ca.mean() - cb.mean()), "ci95": paired_bootstrap(cb, ca, bootstrap),
            "mcnemar_p": mcnemar_p(cb, ca),
            "only_a": int((ca & ~cb).sum()), "only_b": int((~ca & cb).sum())}


def read_knobs(path: str | None) -> confidence.Knobs | None:
    """The DeepConf window and tail a knobs.json fixed (None: the defaults)."""
    if path is None:
        return None
    k = json.loads(Path(path).read_text())
    return confidence.Knobs(window=int(k["window"]), tail=int(k["tail"]),
                            bottom_fraction=float(k.get("bottom_fraction", 0.1)))


def confidence_metrics(rows: list[dict], p: np.ndarray, wrong: np.ndarray, read: np.ndarray,
                       seed: int, n: int, knobs: confidence.Knobs) -> dict:
    """The logprob confidences of the same answers the head read, as failure
    scores (adaras.confidence): each one's AUROC with its CI and the head's
    paired AUROC gain over it, its selective accuracy, and which of them ranks
    best here (`best`; a registered study fixes its best on validation first)."""
    per = [confidence.trace_scores(r["confidence"], knobs) for r in rows]
    stats = {k: np.array([s[k] for s in per], dtype=float)[read]
             for k in confidence.SCORES if k != "length"}
    scored = score_heads(wrong[read], {"answer": p[read], **stats}, seed, n,
                         scores=tuple(stats))
    out = {k: {**{f: v for f, v in scored[k].items() if f not in ("gain", "gain_ci95")},
               **({"answer_auroc_gain": scored[k]["gain"],
                   "answer_auroc_gain_ci95": scored[k]["gain_ci95"]} if "gain" in scored[k]
                  else {}),
               "selective_accuracy": selective_accuracy(wrong[read], v)}
           for k, v in stats.items()}
    ranked = [k for k in stats if out[k].get("auroc") is not None]
    return {"knobs": {"window": knobs.window, "tail": knobs.tail,
                      "bottom_fraction": knobs.bottom_fraction},
            "scores": out, "best": max(ranked, key=lambda k: out[k]["auroc"]) if ranked else None}


def answer_probe_metrics(rows: list[dict], correct: np.ndarray, seed: int,
                         prompt_p: np.ndarray | None = None,
                         n: int = MAX_SCORE_RESAMPLES,
                         knobs: confidence.Knobs | None = None) -> dict:
    """How well the answer head's p_fail tells this arm's wrong answers from
    its right ones: AUROC and ECE, each with a bootstrap 95% CI, over the
    answers it read (a one-token answer has no position to read). With
    `prompt_p` (the prompt predictor's p_fail of each row's problem, nan where
    unknown), `prompt`: both heads on the answers both read (their own count),
    the prompt p_fail's AUROC and ECE and the answer head's AUROC gain over
    it, with a paired CI (the same resamples for both heads).

    Two baselines that cost a client nothing: `length`, the answer's length in
    tokens ranked as a failure score, on the answers the head read (its AUROC,
    and the head's AUROC gain over it with a paired CI); and `finished`, the
    head's AUROC and the same length comparison on the answers not cut at
    max_tokens (a cut answer counts as wrong, and is usually a loop, so it is
    easy to call).

    Beside them: the head's Brier score, calibration slope (with CI) and
    selective accuracy at 50, 70 and 90% coverage, and, when every answer kept
    its per-token logprobs (eval --logprobs), `confidence`: the logprob scores
    any server can compute, each against the head (see confidence_metrics)."""
    p = np.array([(r["steering"] or {}).get("answer_failure_probability") for r in rows],
                 dtype=float)  # None -> nan
    wrong = ~correct
    read = ~np.isnan(p)
    tokens = np.array([r["tokens"] for r in rows], dtype=float)
    finished = read & np.array([not is_cut(r) for r in rows], dtype=bool)
    both = read & ~np.isnan(prompt_p) if prompt_p is not None else None
    # the answer head first: every head after it gets its paired AUROC gain over that
    # head. Where each answer read has its prompt p_fail, one bootstrap scores all three.
    heads = {"answer": p, "length": tokens}
    if both is not None and (both == read).all():
        heads["prompt"] = prompt_p
    own = score_heads(wrong[read], {h: q[read] for h, q in heads.items()}, seed, n,
                      scores=("length",))
    pair = (own if "prompt" in heads else
            score_heads(wrong[both], {"answer": p[both], "prompt": prompt_p[both]}, seed, n)
            if both is not None else None)
    fin = score_heads(wrong[finished], {"answer": p[finished], "length": tokens[finished]},
                      seed, n, scores=("answer", "length"))

    def bare(head: dict) -> dict:  # a head's own numbers, without the answer head's gain
        return {k: v for k, v in head.items() if k not in ("gain", "gain_ci95")}

    def length(head: dict) -> dict:  # length's AUROC, and the answer head's gain over it
        return {**bare(head), **({"answer_auroc_gain": head["gain"],
                                  "answer_auroc_gain_ci95": head["gain_ci95"]}
                                 if "gain" in head else {})}

    out = {"answers": int(read.sum()), "unread": int((~read).sum()),
           "mean": float(p[read].mean()) if read.any() else None, **own["answer"],
           "length": length(own["length"]),
           "finished": {"answers": int(finished.sum()), **fin["answer"],
                        "length": length(fin["length"])}}
    out["brier"] = brier(wrong[read], p[read]) if read.any() else None
    out["selective_accuracy"] = selective_accuracy(wrong[read], p[read])
    out.update(calibration_slope(wrong[read], p[read], seed, min(n, 500)))
    if read.any() and all("confidence" in r for r in rows):
        out["confidence"] = confidence_metrics(rows, p, wrong, read, seed, n,
                                               knobs or confidence.Knobs())
    if pair is not None:
        out["prompt"] = {"answers": int(both.sum()), **bare(pair["prompt"])}
        if "gain" in pair["prompt"]:
            out["prompt"]["answer_auroc"] = pair["answer"]["auroc"]  # on these answers
            out.update(auroc_gain=pair["prompt"]["gain"],
                       auroc_gain_ci95=pair["prompt"]["gain_ci95"])
    return out


def screen(results: dict, min_changed: float = 0.10) -> dict:
    """The alpha screen: for each swept alpha, the fraction of final answers
    that changed, net fixed - broken and mean output length. alpha* is the
    largest alpha that changes at least `min_changed` of the answers without a
    net loss; None (the profile is inert at these alphas) when no alpha
    changes that many."""
    rows = []
    for name, r in results["configs"].items():
        if name.startswith("alpha="):
            rows.append({"alpha": float(name[len("alpha="):]), "changed": r["changed"],
                         "net": r["fixed"] - r["broken"], "fixed": r["fixed"],
                         "broken": r["broken"], "accuracy": r["accuracy"],
                         "mean_tokens": r["mean_tokens"], "truncated": r["truncated"]})
    rows.sort(key=lambda r: r["alpha"])
    moving = [r for r in rows if r["changed"] >= min_changed]
    ok = [r for r in moving if r["net"] >= 0]
    if not moving:
        verdict = (f"inert: no alpha in {[r['alpha'] for r in rows]} changes "
                   f"{min_changed:.0%} of the final answers")
    elif not ok:
        verdict = (f"every alpha that changes {min_changed:.0%} of the answers loses more than "
                   f"it fixes")
    else:
        verdict = f"alpha* = {ok[-1]['alpha']:g}"
    return {"alpha_star": ok[-1]["alpha"] if ok else None, "min_changed": min_changed,
            "verdict": verdict, "baseline_mean_tokens":
            results["configs"]["baseline"]["mean_tokens"], "alphas": rows}


def config_order(name: str) -> tuple:
    """baseline, always, adaptive, random, then the alpha and K sweeps by value,
    then ablation profiles."""
    if name in MODES:
        return (MODES.index(name), 0.0, name)
    for rank, prefix in ((4, "alpha="), (5, "k=")):
        if name.startswith(prefix):
            return (rank, float(name[len(prefix):]), name)
    return (6, 0.0, name)
