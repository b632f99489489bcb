"""`adaras eval`, report and plot: report.md, accuracy.png,
calibration.png and the sweep plots from a stage's results."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from adaras.pipeline.eval_args import EvalArgs
from adaras.pipeline.eval_score import config_order


def write_report(out: Path, results: dict, args: EvalArgs) -> None:
    lines = [f"# Evaluation: {results['dataset']}", "",
             f"{results['problems']} problems (seed {args.seed}; "
             f"{results['removed_overlap']} repeated problems or problems of "
             f"{', '.join(results['excluded_stages']) or 'no other stage'} skipped), greedy "
             f"decoding, max {args.max_tokens} tokens. Profile: `{results['profile']}`.", ""]
    primary = results.get("primary")
    if primary:
        lines += [f"**Pre-registered primary comparison:** `{primary['config']}` vs baseline, "
                  f"exact McNemar: {primary['fixed']} fixed, {primary['broken']} broken, "
                  f"Δ {primary['delta']:+.3f} (95% CI [{primary['ci95'][0]:+.3f}, "
                  f"{primary['ci95'][1]:+.3f}]), p = {primary['mcnemar_p']:.3g}. "
                  + (f"Minimum detectable effect at 80% power with this discordance: "
                     f"{primary['mde80']:.3f}." if primary["mde80"] else ""), ""]
    sec = results.get("secondary")
    if sec:
        a, b = sec["configs"]
        lines += [f"**Key secondary comparison:** `{a}` vs `{b}`, exact McNemar on "
                  f"{sec['problems']} problems: {sec['only_a']} right only with `{a}`, "
                  f"{sec['only_b']} right only with `{b}`, Δ {sec['delta']:+.3f} (95% CI "
                  f"[{sec['ci95'][0]:+.3f}, {sec['ci95'][1]:+.3f}]), p = {sec['mcnemar_p']:.3g}.",
                  ""]
    if results.get("steered_prompt_positions") and "adaptive" in results["configs"]:
        lines += ["Positions: `always`, `minus`, `random` and the sweeps steer the last prompt "
                  "position and every decode step (the profile's `steer_prompt`); `adaptive` "
                  "decides after the prompt, so it steers decode steps only.", ""]
    if results.get("dose_in_sigma") is not None:
        lines += [f"Dose: alpha {results['alpha']:g} on raw S, "
                  f"{results['dose_in_sigma']:.3f} sigma on average per steered neuron.", ""]
    lines += ["| config | accuracy | Wilson 95% CI | Δ vs baseline | paired bootstrap 95% CI "
              "| McNemar p | fixed | broken | answers changed | mean tokens | median tokens "
              "| truncated | gate rate |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in sorted(results["configs"], key=config_order):
        r = results["configs"][name]
        gate = f"{r['gate_rate']:.2f}" if "gate_rate" in r else ""
        base = name == "baseline"
        ci = "" if base else f"[{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]"
        delta = "" if base else f"{r['delta']:+.3f}"
        p = "" if base else f"{r['mcnemar_p']:.3g}"
        wil = r.get("accuracy_ci95") or [float("nan")] * 2
        lines.append(f"| {name} | {r['accuracy']:.3f} | {wil[0]:.3f}-{wil[1]:.3f} | {delta} "
                     f"| {ci} | {p} | {r['fixed']} | "
                     f"{r['broken']} | {r['changed']:.2f} | {r['mean_tokens']:.0f} | "
                     f"{r['median_tokens']:.0f} | "
                     f"{r['truncated']} | {gate} |")
    ad = results["configs"].get("adaptive")
    if ad and ad.get("predictor_auroc") is not None:
        ci = ad.get("predictor_auroc_ci95") or [float("nan")] * 2
        lines += ["", f"Adaptive gate: threshold {ad['threshold']}, fired on "
                  f"{ad['gate_rate_on_baseline_wrong']:.2f} of the problems the baseline got wrong "
                  f"and {ad['gate_rate_on_baseline_right']:.2f} of those it got right. "
                  f"In-engine p_fail against baseline failure: AUROC {ad['predictor_auroc']:.2f} "
                  f"(bootstrap 95% CI {ci[0]:.2f}-{ci[1]:.2f}), expected calibration error "
                  f"{ad['calibration']['ece']:.3f} (calibration.png). The cut that maximises "
                  f"TPR - FPR on these problems (Youden's J): {ad['youden_threshold']:.3f}."]
    probed = [(n, results["configs"][n]["answer_probe"]) for n in
              sorted(results["configs"], key=config_order)
              if "answer_probe" in results["configs"][n]]
    if probed:
        lines += ["", "## Answer probe", "", "The profile's answer head on each arm's own "
                  "answers (its features read in the engine while they decoded), against "
                  "their being wrong; beside it, the prompt predictor's p_fail of the same "
                  "answers' problems (read from the prompt alone, by the arms that run the "
                  "gate) and the answer head's AUROC gain over it, both on the answers that "
                  "both heads read. 95% CIs: percentile bootstrap over answers, the gain's "
                  "paired; ECE's interval sits high (resampling only adds miscalibration).",
                  "",
                  "| config | answers read | AUROC | ECE | mean p_fail | prompt AUROC "
                  "| prompt ECE | AUROC gain |", "|---|---|---|---|---|---|---|---|"]

        def value(x, ci=None, fmt: str = ".3f") -> str:  # "0.812 (0.770 to 0.850)"
            if x is None:  # not computed (one class, or no prompt p_fail)
                return ""
            return format(x, fmt) + (f" ({format(ci[0], fmt)} to {format(ci[1], fmt)})"
                                     if ci else "")

        for name, a in probed:
            pr = a.get("prompt") or {}
            lines.append(
                f"| {name} | {a['answers']} | {value(a.get('auroc'), a.get('auroc_ci95'))} | "
                f"{value(a['calibration']['ece'], a.get('ece_ci95'))} | {value(a.get('mean'))} "
                f"| {value(pr.get('auroc'), pr.get('auroc_ci95'))} | "
                f"{value(pr['calibration']['ece'] if pr else None, pr.get('ece_ci95'))} | "
                f"{value(a.get('auroc_gain'), a.get('auroc_gain_ci95'), '+.3f')} |")
        lines += ["", "What a client has without the probe, on the same answers: the "
                  "answer's length in tokens as a failure score; then both again on the "
                  "answers not cut at max_tokens (a cut answer counts as wrong and is easy to "
                  "call).", "",
                  "| config | length AUROC | head's AUROC gain over length | finished answers "
                  "| head AUROC on them | length AUROC on them | head's gain on them |",
                  "|---|---|---|---|---|---|---|"]
        for name, a in probed:
            ln, fin = a.get("length") or {}, a.get("finished") or {}
            fln = fin.get("length") or {}
            lines.append(
                f"| {name} | {value(ln.get('auroc'), ln.get('auroc_ci95'))} | "
                f"{value(ln.get('answer_auroc_gain'), ln.get('answer_auroc_gain_ci95'), '+.3f')}"
                f" | {fin.get('answers', '')} | "
                f"{value(fin.get('auroc'), fin.get('auroc_ci95'))} | "
                f"{value(fln.get('auroc'), fln.get('auroc_ci95'))} | "
                f"{value(fln.get('answer_auroc_gain'), fln.get('answer_auroc_gain_ci95'), '+.3f')}"
                " |")
    wo = results.get("without")
    if wo:
        lines += ["", f"## Without {len(wo['excluded'])} problems listed in `{wo['file']}`", "",
                  "| config | problems | accuracy | Δ vs baseline | paired bootstrap 95% CI "
                  "| McNemar p | answer-probe AUROC |", "|---|---|---|---|---|---|---|"]
        for name in sorted(wo["configs"], key=config_order):
            r = wo["configs"][name]
            base = name == "baseline"
            ci = "" if base else f"[{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]"
            auc = (r.get("answer_probe") or {}).get("auroc")
            lines.append(f"| {name} | {r['problems']} | {r['accuracy']:.3f} | "
                         f"{'' if base else format(r['delta'], '+.3f')} | {ci} | "
                         f"{'' if base else format(r['mcnemar_p'], '.3g')} | "
                         f"{'' if auc is None else format(auc, '.3f')} |")
        if wo.get("secondary"):
            w = wo["secondary"]
            lines += ["", f"Key secondary without them: Δ {w['delta']:+.3f} (95% CI "
                      f"[{w['ci95'][0]:+.3f}, {w['ci95'][1]:+.3f}]), p = {w['mcnemar_p']:.3g}."]
    sc = results.get("screen")
    if sc:
        lines += ["", f"## Alpha screen: {sc['verdict']}", "",
                  f"alpha* is the largest alpha that changes at least {sc['min_changed']:.0%} "
                  "of the final answers without a net loss (fixed - broken >= 0). Baseline "
                  f"mean output: {sc['baseline_mean_tokens']:.0f} tokens.", "",
                  "| alpha | answers changed | fixed | broken | net | accuracy | mean tokens "
                  "| truncated |", "|---|---|---|---|---|---|---|---|"]
        for r in sc["alphas"]:
            lines.append(f"| {r['alpha']:g} | {r['changed']:.2f} | {r['fixed']} | {r['broken']} "
                         f"| {r['net']:+d} | {r['accuracy']:.3f} | {r['mean_tokens']:.0f} "
                         f"| {r['truncated']} |")
    tp = results.get("throughput") or {}
    if tp.get("seconds"):
        lines += ["", f"Generation: {tp['generated_tokens']} tokens in {tp['seconds']:.0f} s "
                  f"({tp['generated_tok_s']:.0f} generated tok/s)."]
    lines += ["", "A difference is significant at 95% only when its CI excludes 0 (bootstrap) "
              "or p < 0.05 (McNemar).", ""]
    (out / "report.md").write_text("\n".join(lines))


def plot_calibration(out: Path, results: dict) -> None:
    """Reliability diagram of the adaptive gate's p_fail against baseline failure."""
    ad = results["configs"].get("adaptive")
    if not ad or "calibration" not in ad:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = np.array(ad["calibration"]["bins"])  # [B, 3]: mean p, observed rate, count
    fig, ax = plt.subplots(figsize=(3.6, 3.4))
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.scatter(bins[:, 0], bins[:, 1], s=10 + 4 * bins[:, 2], color="#4472c4")
    ax.set_xlabel("predicted p_fail (bin mean)")
    ax.set_ylabel("baseline failure rate")
    ax.set_title(f"calibration, ECE {ad['calibration']['ece']:.3f}", fontsize=9)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(out / "calibration.png", dpi=120)
    plt.close(fig)


def plot_results(out: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = results["configs"]
    base = configs["baseline"]["accuracy"]
    names = sorted(configs, key=config_order)
    acc = [configs[n]["accuracy"] for n in names]
    # error bars: the CI of the difference, drawn around baseline + delta
    lo = [base + configs[n]["ci95"][0] for n in names]
    hi = [base + configs[n]["ci95"][1] for n in names]
    err = np.array([[a - lo_ for a, lo_ in zip(acc, lo)], [hi_ - a for a, hi_ in zip(acc, hi)]])
    err = np.clip(err, 0, None)
    fig, ax = plt.subplots(figsize=(max(4, len(names) * 0.9), 3.2))
    ax.bar(names, acc, yerr=err, capsize=3, color="#4472c4")
    ax.axhline(base, color="k", lw=0.8, ls="--")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{results['dataset']} ({results['problems']} problems)\n"
                 "error bars: paired-bootstrap 95% CI of the change", fontsize=9)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    plt.close(fig)
    for prefix, label in (("alpha=", "alpha"), ("k=", "K")):
        sweep = [(float(n[len(prefix):]), configs[n]["accuracy"]) for n in names
                 if n.startswith(prefix)]
        if len(sweep) < 2:
            continue
        sweep.sort()
        fig, ax = plt.subplots(figsize=(4, 3))
        ax.plot([x for x, _ in sweep], [a for _, a in sweep], "o-")
        ax.axhline(base, color="k", lw=0.8, ls="--", label="baseline")
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"sweep-{label.lower()}.png", dpi=120)
        plt.close(fig)
