"""The MATH study's registered verdict, computed from its saved results, so
that the rules written in README.md before stage 3 ran are applied as written:

    python3 verdict.py [STUDY_DIR]    (run.sh verdict; STUDY_DIR: this folder)

reads confirm/results.json (required), humaneval/results.json and
best-of-n/results.json (each "pending" while absent) and
confirm-registration.json, and writes STUDY_DIR/verdict.json and verdict.md.

The rules (README, stage 3 and the answer-probe section; issue 18 item 9):
- primary: `always` (+S) vs `baseline`, exact McNemar, two-sided, at 0.05;
- helps: a gain on the primary with p < 0.05 and no HumanEval loss (`always`
  vs `baseline`) with p < 0.05; it decides the served default;
- issue 18's goal: +3 points or more on the primary with p < 0.05;
- answer probe goals, judged on the point estimate (CI printed beside it):
  AUROC >= 0.88 and ECE <= 0.05 on the baseline answers; best-of-4 by the
  probe >= greedy + 5 points. A goal that cannot be judged (no answer read,
  one class, best-of-n without the greedy reference) is None, not "not met".
  Beside them, not goals: the free baselines the head must beat (the answer's
  length as a failure score, the head on answers not cut at max_tokens, the
  samples' length within a problem, the shortest of k samples).
Differences are compared with a 1e-9 tolerance: +15 of 500 is +3 points even
when the difference of two means comes out 0.029999999999999971.
It also checks that the runs are the registered ones (confirm: `always` as the
primary, alpha 0.3, the registered problem count; HumanEval: 164 problems) and
lists every mismatch under `warnings`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

LEVEL = 0.05
EPS = 1e-9
GOAL_POINTS = 0.03
AUROC_GOAL, ECE_GOAL, BEST_OF_4_GOAL = 0.88, 0.05, 0.05
ARMS = ("baseline", "always", "minus", "random", "adaptive", "noise")


def load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def test(c: dict) -> dict:
    """A paired comparison as registered: difference, its CI, exact McNemar p."""
    return {k: c[k] for k in ("delta", "ci95", "mcnemar_p") if k in c} | {
        "fixed": c.get("fixed", c.get("only_a")), "broken": c.get("broken", c.get("only_b")),
        "problems": c["problems"],
        "gain": c["mcnemar_p"] < LEVEL and c["delta"] > 0,
        "loss": c["mcnemar_p"] < LEVEL and c["delta"] < 0}


def verdict(study: Path) -> dict:
    confirm = load(study / "confirm" / "results.json")
    if confirm is None:
        raise FileNotFoundError(f"{study}/confirm/results.json: run and save confirm first")
    humaneval = load(study / "humaneval" / "results.json")
    best = load(study / "best-of-n" / "results.json")
    configs = confirm["configs"]
    primary = test(configs["always"])
    transfer = test(humaneval["configs"]["always"]) if humaneval else None
    if transfer is None:
        helps = None if primary["gain"] else False  # without a gain nothing can help
    else:
        helps = primary["gain"] and not transfer["loss"]
    out = {
        "registration": load(study / "confirm-registration.json"),
        "alpha": confirm.get("alpha"), "dose_in_sigma": confirm.get("dose_in_sigma"),
        "primary": {"accuracy_baseline": configs["baseline"]["accuracy"],
                    "accuracy_always": configs["always"]["accuracy"], **primary},
        "key_secondary": test(confirm["secondary"]) if "secondary" in confirm else None,
        "without": ({"excluded": confirm["without"]["excluded"],
                     "primary": test(confirm["without"]["configs"]["always"]),
                     "key_secondary": test(confirm["without"]["secondary"])
                     if "secondary" in confirm["without"] else None}
                    if "without" in confirm else None),
        "arms": {a: {k: configs[a].get(k) for k in (
            "problems", "accuracy", "accuracy_ci95", "delta", "ci95", "mcnemar_p", "fixed",
            "broken", "changed", "truncated", "median_tokens", "gate_rate")}
            for a in ARMS if a in configs},
        "humaneval": transfer,
        "helps": helps,
        "goal_met": primary["gain"] and primary["delta"] >= GOAL_POINTS - EPS,
        "served_default": served_default(helps, confirm.get("alpha")),
        "answer_probe": answer_probe(configs, best),
        "answer_probe_without": (answer_probe(confirm["without"]["configs"], None)
                                 if "without" in confirm else None),
        "warnings": mismatches(confirm, humaneval, load(study / "confirm-registration.json")),
    }
    return out


def mismatches(confirm: dict, humaneval: dict | None, registration: dict | None) -> list[str]:
    """How the saved runs differ from the registered ones (empty when they match)."""
    out = []
    if (confirm.get("primary") or {}).get("config") != "always":
        out.append("confirm's primary is not `always` vs baseline")
    if confirm.get("alpha") is None or abs(confirm["alpha"] - 0.3) > EPS:
        out.append(f"confirm ran at alpha {confirm.get('alpha')}, not the registered 0.3")
    want = ((registration or {}).get("arms") or {}).get("always")
    if want is None:
        out.append("no confirm-registration.json beside the results")
    elif confirm["configs"]["always"]["problems"] != want:
        out.append(f"confirm's always arm ran {confirm['configs']['always']['problems']} "
                   f"problems, not the registered {want}")
    if humaneval is not None and humaneval["configs"]["always"]["problems"] != 164:
        out.append(f"HumanEval ran {humaneval['configs']['always']['problems']} problems, "
                   "not all 164")
    return out


def served_default(helps: bool | None, alpha) -> str:
    if helps is None:
        return "pending: the primary shows a gain; HumanEval decides (run and save humaneval)"
    if helps:
        return (f"the bundled Qwen2.5-Coder-1.5B profile keeps these neurons with alpha {alpha} "
                "as its default dose")
    return (f"steering did not help at the paper's own dose (alpha {alpha}); the bundled profile "
            "is served for its answer probe, with steering off unless a request asks")


def answer_probe(configs: dict, best: dict | None) -> dict:
    out = {}
    for arm in ("baseline", "always"):
        a = configs.get(arm, {}).get("answer_probe")
        if a:
            prompt = a.get("prompt") or {}
            out[arm] = {"answers": a["answers"], "auroc": a.get("auroc"),
                        "auroc_ci95": a.get("auroc_ci95"),
                        "ece": a["calibration"]["ece"] if a["answers"] else None,
                        "ece_ci95": a.get("ece_ci95"),
                        "prompt_auroc": prompt.get("auroc"),
                        "prompt_ece": (prompt["calibration"]["ece"]
                                       if prompt.get("answers") else None),
                        "auroc_gain": a.get("auroc_gain"),
                        "auroc_gain_ci95": a.get("auroc_gain_ci95"),
                        # free baselines (absent from results written before they existed)
                        "length": a.get("length"), "finished": a.get("finished")}
    if "baseline" in out:  # None: cannot be judged (no answer read, or one class)
        b = out["baseline"]
        out["auroc_goal_met"] = None if b["auroc"] is None else b["auroc"] >= AUROC_GOAL - EPS
        out["ece_goal_met"] = None if b["ece"] is None else b["ece"] <= ECE_GOAL + EPS
    if best is not None:
        m = best["methods"].get("probe best-of-4")
        ref = best["reference"]
        met = (None if ref != "greedy" or m is None or "delta_vs_greedy" not in m
               else m["delta_vs_greedy"] >= BEST_OF_4_GOAL - EPS)
        out["best_of_n"] = {"reference": ref, "within_problem_auroc":
                            best["within_problem_auroc"], "within_problem_auroc_length":
                            best.get("within_problem_auroc_length"),
                            "methods": best["methods"], "best_of_4_goal_met": met}
    return out


def judged(met: bool | None) -> str:
    return {True: "met", False: "not met", None: "cannot be judged"}[met]


def pct(x) -> str:
    return "" if x is None else f"{100 * x:+.1f}"


def ci(c) -> str:
    return "" if not c else f"[{100 * c[0]:+.1f}, {100 * c[1]:+.1f}]"


def num(x, c=None) -> str:  # "0.812 (0.770–0.850)"
    return "" if x is None else f"{x:.3f}" + (f" ({c[0]:.3f}–{c[1]:.3f})" if c else "")


def markdown(v: dict) -> str:
    p = v["primary"]
    lines = ["# Verdict (computed by verdict.py from the saved results)", "",
             *[f"**Warning: {w}.**" for w in v["warnings"]], *([""] if v["warnings"] else []),
             f"Dose: alpha {v['alpha']} on raw S ({v['dose_in_sigma']:.3f} sigma)."
             if v["dose_in_sigma"] is not None else f"Dose: alpha {v['alpha']}.", "",
             f"**Primary (+S vs baseline, {p['problems']} problems):** "
             f"{100 * p['accuracy_always']:.1f}% vs {100 * p['accuracy_baseline']:.1f}%, "
             f"{pct(p['delta'])} points (paired bootstrap 95% CI {ci(p['ci95'])}), "
             f"{p['fixed']} fixed and {p['broken']} broken, exact McNemar p = "
             f"{p['mcnemar_p']:.3g}: " + ("a significant gain." if p["gain"] else
                                          "a significant loss." if p["loss"] else
                                          "no significant difference."), ""]
    rows = [("key secondary (+S vs -S)", v["key_secondary"])]
    if v["without"]:
        n = len(v["without"]["excluded"])
        rows += [(f"primary without {n} near-duplicates", v["without"]["primary"]),
                 (f"key secondary without {n} near-duplicates", v["without"]["key_secondary"])]
    rows.append(("HumanEval (+S vs baseline)", v["humaneval"]))
    lines += ["| comparison | problems | Δ points | 95% CI | fixed | broken | McNemar p |",
              "|---|---|---|---|---|---|---|"]
    for name, t in rows:
        lines.append(f"| {name} | pending | | | | | |" if t is None else
                     f"| {name} | {t['problems']} | {pct(t['delta'])} | {ci(t['ci95'])} | "
                     f"{t['fixed']} | {t['broken']} | {t['mcnemar_p']:.3g} |")
    lines += ["", "| arm | accuracy (Wilson 95% CI) | Δ vs baseline | 95% CI | McNemar p | "
              "answers changed | truncated | median tokens |", "|---|---|---|---|---|---|---|---|"]
    for arm, a in v["arms"].items():
        w = a["accuracy_ci95"] or [float("nan")] * 2
        lines.append(f"| {arm} | {100 * a['accuracy']:.1f}% ({100 * w[0]:.1f}–{100 * w[1]:.1f}) "
                     f"| {pct(a['delta'])} | {ci(a['ci95'])} | {a['mcnemar_p']:.3g} | "
                     f"{a['changed']:.3f} | {a['truncated']} | {a['median_tokens']:.0f} |")
    helps = {True: "yes", False: "no", None: "pending"}[v["helps"]]
    lines += ["", f"**Helps (registered rule): {helps}.** Served default: {v['served_default']}.",
              f"Issue 18's goal (+3 points with p < 0.05): {judged(v['goal_met'])}.", ""]
    ap = v["answer_probe"]
    if "baseline" in ap:
        lines += ["## Answer probe", "", "| answers of | read | AUROC (95% CI) | ECE (95% CI) "
                  "| prompt p_fail AUROC | prompt p_fail ECE | AUROC gain (95% CI) |",
                  "|---|---|---|---|---|---|---|"]
        without = v.get("answer_probe_without") or {}
        for label, probe in (("", ap), (" (without near-duplicates)", without)):
            for arm in ("baseline", "always"):
                if arm in probe:
                    a = probe[arm]
                    lines.append(f"| {arm}{label} | {a['answers']} | "
                                 f"{num(a['auroc'], a['auroc_ci95'])} | "
                                 f"{num(a['ece'], a['ece_ci95'])} | {num(a['prompt_auroc'])} | "
                                 f"{num(a['prompt_ece'])} | "
                                 f"{num(a['auroc_gain'], a['auroc_gain_ci95'])} |")
        lines += ["", f"Goals on the baseline answers: AUROC ≥ {AUROC_GOAL} "
                  f"{judged(ap['auroc_goal_met'])}; ECE ≤ {ECE_GOAL} "
                  f"{judged(ap['ece_goal_met'])}.", "",
                  "Free baselines (not goals): the answer's length in tokens as a failure "
                  "score, and the head on the answers not cut at max_tokens.", "",
                  "| answers of | length AUROC (95% CI) | head's gain over length (95% CI) "
                  "| finished answers | head AUROC on them (95% CI) | head's gain over length "
                  "on them (95% CI) |", "|---|---|---|---|---|---|"]
        for arm in ("baseline", "always"):
            if arm in ap:
                ln, fin = ap[arm].get("length") or {}, ap[arm].get("finished") or {}
                fln = fin.get("length") or {}
                lines.append(f"| {arm} | {num(ln.get('auroc'), ln.get('auroc_ci95'))} | "
                             f"{num(ln.get('answer_auroc_gain'), ln.get('answer_auroc_gain_ci95'))}"
                             f" | {fin.get('answers', '')} | "
                             f"{num(fin.get('auroc'), fin.get('auroc_ci95'))} | "
                             f"{num(fln.get('answer_auroc_gain'), fln.get('answer_auroc_gain_ci95'))}"
                             " |")
    if "best_of_n" in ap:
        b = ap["best_of_n"]
        w = b["within_problem_auroc"]
        lines += ["", f"Best of n (reference: {b['reference']}): within-problem AUROC "
                  f"{num(w['auroc'], w.get('ci95'))} over {w['pairs']} pairs" +
                  (f"; the samples' length alone: {num(wl['auroc'], wl.get('ci95'))} over "
                   f"{wl['pairs']} pairs." if (wl := b.get("within_problem_auroc_length"))
                   else "."), "",
                  f"| method | accuracy | Δ vs {b['reference']} | 95% CI | mean tokens |",
                  "|---|---|---|---|---|"]
        for name, m in b["methods"].items():
            lines.append(f"| {name} | {100 * m['accuracy']:.1f}% | "
                         f"{pct(m.get('delta_vs_' + b['reference']))} | {ci(m.get('ci95'))} | "
                         f"{m['mean_tokens']:.0f} |")
        lines += ["", f"Goal (best-of-4 by the probe ≥ greedy + 5 points): "
                  f"{judged(b['best_of_4_goal_met'])}."]
    elif "baseline" in ap:
        lines += ["", "Best of n: pending."]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    study = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent
    try:
        v = verdict(study)
    except (FileNotFoundError, ValueError) as e:  # ValueError: a file that is not JSON
        print(f"verdict: {e}", file=sys.stderr)
        return 2
    (study / "verdict.json").write_text(json.dumps(v, indent=2, sort_keys=True) + "\n")
    (study / "verdict.md").write_text(markdown(v))
    print(markdown(v))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
