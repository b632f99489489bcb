"""The MATH study's registered verdict (the 2026-12-08 amendment, issue 33),
computed from its saved results, so that the rule written in README.md and
heldout-registration.json before the held-out stage ran is applied as written:

    python3 verdict.py [STUDY_DIR]    (run.sh verdict; STUDY_DIR: this folder)

reads heldout/results.json and heldout/outcomes.jsonl (required) and
heldout-registration.json, and writes STUDY_DIR/verdict.json and verdict.md.

The rule:
- primary: `always` (+S) vs `baseline`, exact McNemar, two-sided, at 0.05:
  "helps" (p < 0.05, +S above), "hurts" (p < 0.05, +S below), or "no detectable
  effect" (p >= 0.05, with the MDE at 80% power at the observed discordance);
- key secondary: `always` vs `minus` in the same form ("the sign of S mattered"
  or "made no detectable difference");
- noise floor: the answers +S flipped (fixed + broken) on the noise arm's
  problems against the flips of the noise arm (the baseline again, another
  batch mix) on the same problems; +S "moves answers no more than batch
  composition does" when its flips are not more;
- the conditional arms (random, adaptive) are due when the primary or the key
  secondary has p < 0.1;
- `adaras serve` keeps steering off by default unless the primary shows a gain.
Differences are compared with a 1e-9 tolerance. It also checks that the run is
the registered one (primary `always`, alpha 0.3, 300 problems, float32, one CPU
kind) and lists every mismatch under `warnings`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

LEVEL, CONDITIONAL_LEVEL = 0.05, 0.1
EPS = 1e-9
N_PROBLEMS, ALPHA = 300, 0.3
ARMS = ("baseline", "always", "minus", "noise", "random", "adaptive")
TASK = "MATH-500 (first 300)"


def load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def read_outcomes(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test(c: dict) -> dict:
    """A paired comparison as registered: difference, its CI, exact McNemar p."""
    return {k: c[k] for k in ("delta", "ci95", "mcnemar_p", "mde80") if k in c} | {
        "fixed": c.get("fixed", c.get("only_a")), "broken": c.get("broken", c.get("only_b")),
        "problems": c["problems"],
        "gain": c["mcnemar_p"] < LEVEL and c["delta"] > EPS,
        "loss": c["mcnemar_p"] < LEVEL and c["delta"] < -EPS}


def outcome(t: dict) -> str:
    return "helps" if t["gain"] else "hurts" if t["loss"] else "no detectable effect"


def pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def ci(c) -> str:
    return "" if not c else f"{100 * c[0]:+.1f} to {100 * c[1]:+.1f}"


def primary_words(t: dict) -> str:
    """The sentence the README's status line uses, fixed by the registration."""
    if t["gain"]:
        return (f"AdaRAS +S at the paper's dose helps Qwen2.5-Coder-1.5B on {TASK}: "
                f"{pts(t['delta'])} points (95% CI {ci(t['ci95'])}), p = {t['mcnemar_p']:.3g}; "
                "on MATH, transfer not measured.")
    if t["loss"]:
        return (f"AdaRAS +S at the paper's dose hurts Qwen2.5-Coder-1.5B on {TASK}: "
                f"{pts(t['delta'])} points (95% CI {ci(t['ci95'])}), p = {t['mcnemar_p']:.3g}.")
    mde = t.get("mde80")
    return (f"No detectable effect of AdaRAS +S at the paper's dose on {TASK}: "
            f"{pts(t['delta'])} points (95% CI {ci(t['ci95'])}), p = {t['mcnemar_p']:.3g}; "
            + (f"this study could detect about {100 * mde:.1f} points at 80% power at the "
               "observed discordance." if mde is not None else
               "no answer changed, so no detectable effect can be computed."))


def secondary_words(t: dict) -> str:
    head = ("the sign of S mattered" if t["gain"] or t["loss"]
            else "the sign of S made no detectable difference")
    return (f"+S against −S: {head}: {pts(t['delta'])} points (95% CI {ci(t['ci95'])}), "
            f"p = {t['mcnemar_p']:.3g}.")


def noise_floor(rows: list[dict]) -> dict | None:
    """+S's flips against the baseline on the noise arm's problems, beside the
    noise arm's own flips on them."""
    by = {(r["arm"], r["problem"]): bool(r["correct"]) for r in rows}
    problems = sorted(p for a, p in by if a == "noise")
    if not problems:
        return None

    def flips(arm: str) -> dict:
        both = [p for p in problems if (arm, p) in by and ("baseline", p) in by]
        fixed = sum(by[(arm, p)] and not by[("baseline", p)] for p in both)
        broken = sum(by[("baseline", p)] and not by[(arm, p)] for p in both)
        return {"problems": len(both), "fixed": fixed, "broken": broken, "flips": fixed + broken}

    s, n = flips("always"), flips("noise")
    return {"always": s, "noise": n, "within_noise": s["flips"] <= n["flips"]}


def mismatches(results: dict, registration: dict | None, manifest: dict | None) -> list[str]:
    out = []
    if (results.get("primary") or {}).get("config") != "always":
        out.append("the primary is not `always` vs baseline")
    if results.get("alpha") is None or abs(results["alpha"] - ALPHA) > EPS:
        out.append(f"the run's alpha is {results.get('alpha')}, not the registered {ALPHA}")
    if registration is None:
        out.append("no heldout-registration.json beside the results")
    for arm in ("baseline", "always", "minus"):
        got = results["configs"].get(arm, {}).get("problems")
        if got != N_PROBLEMS:
            out.append(f"the {arm} arm ran {got} problems, not the registered {N_PROBLEMS}")
    if manifest is not None:
        dtypes = manifest.get("engine_dtypes") or []
        if dtypes != ["float32"]:
            out.append(f"the engine ran in {dtypes or 'an unrecorded dtype'}, not float32 alone")
        kinds = {m.get("isa") for m in manifest.get("machines") or []}
        if len(kinds) > 1:
            out.append(f"the arms ran on more than one CPU kind ({sorted(map(str, kinds))}): "
                       "pairs across kinds are not bit-comparable")
    return out


def verdict(study: Path) -> dict:
    results = load(study / "heldout" / "results.json")
    if results is None:
        raise FileNotFoundError(f"{study}/heldout/results.json: run and save heldout first")
    rows = read_outcomes(study / "heldout" / "outcomes.jsonl")
    configs = results["configs"]
    primary = test(configs["always"])
    secondary = test(results["secondary"]) if "secondary" in results else None
    conditional = primary["mcnemar_p"] < CONDITIONAL_LEVEL or (
        secondary is not None and secondary["mcnemar_p"] < CONDITIONAL_LEVEL)
    registration = load(study / "heldout-registration.json")
    manifest = load(study / "heldout" / "manifest.json")
    return {
        "registration": registration,
        "alpha": results.get("alpha"), "dose_in_sigma": results.get("dose_in_sigma"),
        "outcome": outcome(primary),
        "words": primary_words(primary),
        "primary": {"accuracy_baseline": configs["baseline"]["accuracy"],
                    "accuracy_always": configs["always"]["accuracy"], **primary},
        "key_secondary": secondary,
        "key_secondary_words": secondary_words(secondary) if secondary else None,
        "without": ({"excluded": results["without"]["excluded"],
                     "primary": test(results["without"]["configs"]["always"]),
                     "key_secondary": test(results["without"]["secondary"])
                     if "secondary" in results["without"] else None}
                    if "without" in results else None),
        "noise_floor": noise_floor(rows),
        "arms": {a: {k: configs[a].get(k) for k in (
            "problems", "accuracy", "accuracy_ci95", "delta", "ci95", "mcnemar_p", "fixed",
            "broken", "changed", "truncated", "mean_tokens", "median_tokens", "gate_rate")}
            for a in ARMS if a in configs},
        "conditional_arms_due": bool(conditional),
        "served_default": ("steering may be recommended for this profile (the primary shows a "
                           "gain); it stays off until a request asks" if primary["gain"] else
                           "steering stays off by default: the primary shows no gain"),
        "warnings": mismatches(results, registration, manifest),
    }


def markdown(v: dict) -> str:
    nf = v["noise_floor"]
    lines = ["# Verdict (computed by verdict.py from the saved results)", "",
             *[f"**Warning: {w}.**" for w in v["warnings"]], *([""] if v["warnings"] else []),
             f"**{v['outcome'].capitalize()}.** {v['words']}", ""]
    if v["key_secondary_words"]:
        lines += [v["key_secondary_words"], ""]
    if nf is not None:
        s, n = nf["always"], nf["noise"]
        lines += [f"Noise floor, on the noise arm's {n['problems']} problems: +S flipped "
                  f"{s['flips']} answers ({s['fixed']} fixed, {s['broken']} broken), the baseline "
                  f"rerun in another batch mix flipped {n['flips']} ({n['fixed']} fixed, "
                  f"{n['broken']} broken)"
                  + (": +S moves answers no more than batch composition does." if
                     nf["within_noise"] else "."), ""]
    lines += [f"Conditional arms (random, adaptive) {'are' if v['conditional_arms_due'] else 'are not'}"
              " due (primary or key secondary p < 0.1).", "",
              f"Served default: {v['served_default']}.", "",
              "| arm | problems | accuracy | vs baseline | 95% CI | McNemar p | fixed | broken |"
              " truncated | mean tokens |", "|---|---|---|---|---|---|---|---|---|---|"]
    for arm, a in v["arms"].items():
        paired = ["", "", "", "", ""] if arm == "baseline" else [
            pts(a["delta"]), ci(a["ci95"]), f"{a['mcnemar_p']:.3g}", str(a["fixed"]),
            str(a["broken"])]
        tokens = "" if a.get("mean_tokens") is None else str(round(a["mean_tokens"]))
        lines.append("| " + " | ".join([arm, str(a["problems"]), f"{a['accuracy']:.3f}",
                                         *paired, str(a["truncated"]), tokens]) + " |")
    if v["without"]:
        w = v["without"]["primary"]
        lines += ["", f"Without the {len(v['without']['excluded'])} near-duplicates: +S "
                      f"{pts(w['delta'])} points (95% CI {ci(w['ci95'])}), p = {w['mcnemar_p']:.3g}."]
    return "\n".join(lines) + "\n"


def main(study: Path) -> dict:
    v = verdict(study)
    (study / "verdict.json").write_text(json.dumps(v, indent=2) + "\n")
    (study / "verdict.md").write_text(markdown(v))
    print(markdown(v))
    return v


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent)
