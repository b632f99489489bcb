"""`adaras train-predictor`: the failure predictor (docs/pipeline.md, train-predictor).

Data: every collected problem, labelled 1 when the model's greedy answer is
wrong. Problems are split into train / validation / test (stratified).

    1. capture each prompt's mean activation of every neuron (engine, prefill)
    2. ANOVA F-score on the training problems -> top F (256) neurons
    3. capture those F neurons per prompt token
    4. FailurePredictor: standardise, attention-pool over tokens, Linear-ReLU-
       Dropout(0.3)-Linear; BCE, Adam(lr 1e-4, wd 1e-5), early stopping on the
       validation loss (patience 10)
    5. baselines: L1 logistic regression on last-token and on mean-pooled values
       of the same F neurons
    6. AUROC on the held-out test problems (+ bootstrap CI), ROC plot; the
       threshold is calibrated on the validation problems (Youden's J) and
       stored in the profile with the predictor.

Artifacts in <run>/train-predictor/: profile.safetensors (the identify
profile + predictor + threshold), metrics.json, roc.png, training.png.

`--target answer` trains the profile's second head, the answer probe, the same
way on other data: every collected trace (the greedy answers and the sampled
traces; label 1 when the graded answer is wrong, a truncated answer being
wrong, as served), read at the positions the model processes after the prompt
(every generated token but the last, which never passes through the model).
Traces of one problem stay in one split (stratified by the problem's greedy
label). Artifacts in <run>/train-answer-probe/; the profile keeps its prompt
predictor and gains `answer_predictor`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from adaras.pipeline.capture import capture_cached
from adaras.pipeline.grade import counts_as_correct, is_cut
from adaras.pipeline.llm import EngineOptions, Job, capture_params
from adaras.pipeline.run import Run, read_jsonl, write_json
from adaras.pipeline.stats import auroc, score_heads, youden_threshold
from adaras.predictor import FailurePredictor
from adaras.profile import SteeringProfile


@dataclass
class TrainArgs:
    features: int = 256
    hidden: int = 256
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    lr: float = 1e-4
    weight_decay: float = 1e-5
    batch_size: int = 16
    max_epochs: int = 2000
    patience: int = 10
    seed: int = 0
    profile: str | None = None  # default: <run>/identify/profile.safetensors
    # (--target answer: the run's train-predictor profile when there is one)
    target: str = "prompt"  # "prompt": the failure predictor; "answer": the answer probe

TARGETS = ("prompt", "answer")


def train_predictor(run: Run, args: TrainArgs, engine: EngineOptions, *,
                    restart: bool = False) -> Path:
    if args.target not in TARGETS:
        raise ValueError(f"--target must be one of {list(TARGETS)}, got {args.target!r}")
    if args.target == "answer":
        return train_answer_probe(run, args, engine, restart=restart)
    run.require("collect")
    source = Path(args.profile) if args.profile else run.root / "identify" / "profile.safetensors"
    if not source.exists():
        raise FileNotFoundError(f"{source} not found; run `adaras identify` first or pass --profile")
    with run.stage("train-predictor", {**vars(args), "engine": engine.to_dict()},
                   restart=restart) as out:
        rows = read_jsonl(run.root / "collect" / "greedy.jsonl")
        keys = [r["key"] for r in rows]
        prompts = {r["key"]: r["prompt"] for r in rows}
        y = np.array([0 if counts_as_correct(r) else 1 for r in rows])  # 1 = wrong or cut
        split = split_problems(y, args.val_fraction, args.test_fraction, args.seed)
        profile = SteeringProfile.load(source)
        shape = profile.model

        means = capture_cached(run, "prompt-mean", capture_jobs(keys, prompts, {"mean_from": 0}),
                               "mean", engine)
        layers, neurons, feats, tag = choose_features(means, keys, y, split, args, shape)
        tokens = capture_cached(run, f"prompt-tokens-{tag}",
                                capture_jobs(keys, prompts, {"features": feats}), "tokens", engine)
        seqs = [torch.from_numpy(np.ascontiguousarray(tokens[k])) for k in keys]  # [T_i, F]

        torch.manual_seed(args.seed)
        model, history = fit(seqs, y, split, layers, neurons, args)
        probs = predict(model, seqs)  # [N]
        threshold = youden_threshold(y[split["val"]], probs[split["val"]])
        baselines = fit_baselines(seqs, y, split, args.seed)
        metrics = {
            "n": {name: int(idx.size) for name, idx in split.items()},
            "failure_rate": {name: float(y[idx].mean()) if idx.size else None
                             for name, idx in split.items()},
            **test_scores(y[split["test"]], probs[split["test"]], args.seed),
            "auroc_val": auroc(y[split["val"]], probs[split["val"]]),
            "auroc_train": auroc(y[split["train"]], probs[split["train"]]),
            "baselines_auroc_test": {k: v["auroc_test"] for k, v in baselines.items()},
            "threshold": threshold,
            "gate_rate_test": float((probs[split["test"]] >= threshold).mean())
            if split["test"].size else None,
            "epochs": len(history), "best_epoch": int(np.argmin([h["val"] for h in history])) + 1,
            "features": args.features,
        }
        write_json(out / "metrics.json", metrics)
        write_json(out / "predictions.json", {
            "keys": keys, "label_failure": y.tolist(), "p_fail": probs.tolist(),
            "split": {k: v.tolist() for k, v in split.items()}})
        plot_roc(y, probs, baselines, split, out / "roc.png")
        plot_history(history, out / "training.png")

        profile.predictor = model
        profile.threshold = threshold
        profile.provenance = {**profile.provenance, "predictor": {
            "auroc_test": metrics["auroc_test"], "n": metrics["n"],
            "features": f"ANOVA top-{args.features} of prompt-mean activations",
            "threshold_rule": "Youden's J on validation problems"}}
        path = out / "profile.safetensors"
        profile.save(path)
        SteeringProfile.load(path, expect=shape)  # round trip: what we wrote is loadable
        run.record("train-predictor", **{k: metrics[k] for k in (
            "auroc_test", "auroc_test_ci95", "auroc_val", "baselines_auroc_test", "threshold",
            "gate_rate_test", "n")})
        return path


def answer_traces(run: Run) -> list[dict]:
    """Every collected trace that has a position after its prompt: key,
    problem, the token ids the model processes (prompt + every generated token
    but the last), where the answer starts, and its label (1 = the graded answer
    is wrong; truncated answers are wrong, as served), and whether it was greedy."""
    out = []
    for name in ("greedy", "samples"):
        for r in read_jsonl(run.root / "collect" / f"{name}.jsonl"):
            ids = r["completion_ids"]
            if len(ids) < 2:
                continue  # no position after the prompt passes through the model
            wrong = not counts_as_correct(r)
            out.append({"key": r["key"], "problem": r["problem"], "greedy": name == "greedy",
                        "ids": r["prompt"] + ids[:-1], "start": len(r["prompt"]),
                        "label": int(wrong), "finished": not is_cut(r)})
    return out


def split_by_problem(traces: list[dict], problem_label: dict[str, int], args: TrainArgs
                     ) -> dict[str, np.ndarray]:
    """Trace indices per split, every trace of a problem in the problem's split
    (problems stratified by their greedy label)."""
    problems = sorted({t["problem"] for t in traces})
    y = np.array([problem_label.get(p, 0) for p in problems])
    by_problem = split_problems(y, args.val_fraction, args.test_fraction, args.seed)
    where = {problems[i]: name for name, idx in by_problem.items() for i in idx}
    split = {name: np.array([i for i, t in enumerate(traces) if where[t["problem"]] == name],
                            dtype=np.int64) for name in by_problem}
    labels = np.array([t["label"] for t in traces])
    if np.unique(labels[split["train"]]).size < 2:
        raise ValueError("the training traces have only one label; the answer probe needs "
                         "right and wrong answers")
    return split


def train_answer_probe(run: Run, args: TrainArgs, engine: EngineOptions, *,
                       restart: bool = False) -> Path:
    """The answer probe: `FailurePredictor` on features pooled over the
    positions after the prompt, stored as the profile's `answer_predictor`."""
    run.require("collect")
    if args.profile:
        source = Path(args.profile)
    else:
        source = next((run.root / stage / "profile.safetensors" for stage in
                       ("train-predictor", "identify")
                       if (run.root / stage / "profile.safetensors").exists()),
                      run.root / "identify" / "profile.safetensors")
    if not source.exists():
        raise FileNotFoundError(f"{source} not found; run `adaras identify` first or pass --profile")
    with run.stage("train-answer-probe", {**vars(args), "engine": engine.to_dict()},
                   restart=restart) as out:
        traces = answer_traces(run)
        greedy = {r["problem"]: int(not counts_as_correct(r))
                  for r in read_jsonl(run.root / "collect" / "greedy.jsonl")}
        split = split_by_problem(traces, greedy, args)
        y = np.array([t["label"] for t in traces])
        keys = [t["key"] for t in traces]
        ids = {t["key"]: t["ids"] for t in traces}
        profile = SteeringProfile.load(source)
        shape = profile.model
        means = capture_cached(run, "answer-mean", [
            Job(t["key"], t["ids"], capture_params({"mean_from": t["start"]})) for t in traces],
            "mean", engine)
        layers, neurons, feats, tag = choose_features(means, keys, y, split, args, shape)
        tokens = capture_cached(run, f"answer-tokens-{tag}",
                                capture_jobs(keys, ids, {"features": feats}), "tokens", engine)
        start = {t["key"]: t["start"] for t in traces}
        seqs = [torch.from_numpy(np.ascontiguousarray(tokens[k][start[k]:])) for k in keys]

        torch.manual_seed(args.seed)
        model, history = fit(seqs, y, split, layers, neurons, args)
        probs = predict(model, seqs)  # [N]
        baselines = fit_baselines(seqs, y, split, args.seed)
        is_greedy = np.array([t["greedy"] for t in traces])
        finished = np.array([t["finished"] for t in traces])
        test = split["test"]
        greedy_test, sampled_test = test[is_greedy[test]], test[~is_greedy[test]]
        finished_test = test[finished[test]]  # not cut at max_tokens
        metrics = {
            "n": {name: int(idx.size) for name, idx in split.items()},
            "problems": {name: len({traces[i]["problem"] for i in idx})
                         for name, idx in split.items()},
            "failure_rate": {name: float(y[idx].mean()) if idx.size else None
                             for name, idx in split.items()},
            **test_scores(y[test], probs[test], args.seed),
            "auroc_test_greedy": auroc(y[greedy_test], probs[greedy_test]),
            "auroc_test_sampled": auroc(y[sampled_test], probs[sampled_test]),
            # without the answers cut at max_tokens (counted wrong, mostly loops)
            "auroc_test_finished": auroc(y[finished_test], probs[finished_test]),
            "baselines_auroc_test_greedy": {k: auroc(y[greedy_test], v["p"][greedy_test])
                                            for k, v in baselines.items()},
            "auroc_val": auroc(y[split["val"]], probs[split["val"]]),
            "auroc_train": auroc(y[split["train"]], probs[split["train"]]),
            "baselines_auroc_test": {k: v["auroc_test"] for k, v in baselines.items()},
            "epochs": len(history), "best_epoch": int(np.argmin([h["val"] for h in history])) + 1,
            "features": args.features,
        }
        write_json(out / "metrics.json", metrics)
        write_json(out / "predictions.json", {
            "keys": keys, "label_failure": y.tolist(), "p_fail": probs.tolist(),
            "greedy": is_greedy.tolist(), "split": {k: v.tolist() for k, v in split.items()}})
        plot_roc(y, probs, baselines, split, out / "roc.png")
        plot_history(history, out / "training.png")

        profile.answer_predictor = model
        profile.provenance = {**profile.provenance, "answer_predictor": {
            "auroc_test": metrics["auroc_test"], "n": metrics["n"],
            "features": f"ANOVA top-{args.features} of answer-mean activations",
            "positions": "every generated token but the last (teacher-forced)",
            "traces": "collect's greedy answers and sampled traces, unsteered",
            "label": "graded answer wrong (truncated = wrong)"}}
        path = out / "profile.safetensors"
        profile.save(path)
        SteeringProfile.load(path, expect=shape)  # round trip: what we wrote is loadable
        run.record("train-answer-probe", **{k: metrics[k] for k in (
            "auroc_test", "auroc_test_ci95", "auroc_test_greedy", "auroc_test_sampled",
            "auroc_test_finished", "auroc_val", "baselines_auroc_test", "n")})
        return path


def choose_features(means: dict[str, np.ndarray], keys: list[str], y: np.ndarray, split: dict,
                    args: TrainArgs, shape) -> tuple[np.ndarray, np.ndarray, list, str]:
    """The top `args.features` neurons by ANOVA F on the training items' mean
    activations: (layers int32 [F], neurons int32 [F], [[layer, neuron], ...],
    a short tag naming that set for the capture cache)."""
    X = np.stack([means[k].reshape(-1) for k in keys])  # [N, L*I]
    flat = select_features(X[split["train"]], y[split["train"]], args.features)
    layers = (flat // shape.intermediate_size).astype(np.int32)
    neurons = (flat % shape.intermediate_size).astype(np.int32)
    feats = [[int(a), int(b)] for a, b in zip(layers, neurons)]
    return layers, neurons, feats, hashlib.sha256(json.dumps(feats).encode()).hexdigest()[:12]


def split_problems(y: np.ndarray, val: float, test: float, seed: int) -> dict[str, np.ndarray]:
    """Stratified train/val/test indices (stratification is dropped when a
    class is too small for it)."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(y.size)
    if not 0 < val < 1 or not 0 < test < 1 or val + test >= 1:
        raise ValueError(f"val/test fractions must be in (0, 1) with a sum < 1, got {val}, {test}")

    def strat(labels):
        return labels if np.bincount(labels, minlength=2).min() >= 2 else None

    rest, te = train_test_split(idx, test_size=test, random_state=seed, stratify=strat(y))
    tr, va = train_test_split(rest, test_size=val / (1 - test), random_state=seed,
                              stratify=strat(y[rest]))
    if np.unique(y[tr]).size < 2:
        raise ValueError(
            f"the training problems have only one label (greedy failure rate {y.mean():.2f}); "
            "the predictor needs both right and wrong greedy answers: collect more problems or "
            "pick a difficulty where the model fails about half the time")
    return {"train": np.sort(tr), "val": np.sort(va), "test": np.sort(te)}


def capture_jobs(keys: list[str], prompts: dict[str, list[int]], spec: dict) -> list[Job]:
    return [Job(k, prompts[k], capture_params(spec)) for k in keys]


def select_features(X: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """Flat neuron indices of the top-k ANOVA F-scores (ties broken by index)."""
    from sklearn.feature_selection import f_classif

    if k > X.shape[1]:
        raise ValueError(f"--features {k} exceeds the model's {X.shape[1]} neurons")
    with np.errstate(divide="ignore", invalid="ignore"):
        f, _ = f_classif(X, y)
    f = np.nan_to_num(f, nan=0.0, posinf=0.0)  # constant neurons carry no signal
    return np.sort(np.argsort(-f, kind="stable")[:k])


def _batch(seqs: list[torch.Tensor], idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad sequences idx -> x [B, T, F], mask [B, T]."""
    T = max(seqs[i].shape[0] for i in idx)
    F = seqs[idx[0]].shape[1]
    x = torch.zeros(len(idx), T, F)
    mask = torch.zeros(len(idx), T, dtype=torch.bool)
    for b, i in enumerate(idx):
        n = seqs[i].shape[0]
        x[b, :n], mask[b, :n] = seqs[i], True
    return x, mask


def fit(seqs, y, split, layers, neurons, args: TrainArgs):
    model = FailurePredictor(torch.from_numpy(layers), torch.from_numpy(neurons), hidden=args.hidden)
    train_tokens = torch.cat([seqs[i] for i in split["train"]])  # [sum T, F]
    with torch.no_grad():
        model.mean.copy_(train_tokens.mean(dim=0))
        model.std.copy_(train_tokens.std(dim=0).clamp_min(1e-6))
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    yt = torch.from_numpy(y).float()
    # unbalanced labels: weigh the positive (failure) class so both count equally
    pos = float(yt[split["train"]].sum())
    pos_weight = torch.tensor((len(split["train"]) - pos) / max(pos, 1.0))
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    val_idx = split["val"] if split["val"].size else split["train"]
    xv, mv = _batch(seqs, val_idx)
    rng = np.random.default_rng(args.seed)
    best, best_state, bad, history = float("inf"), None, 0, []
    for _epoch in range(args.max_epochs):
        model.train()
        order = rng.permutation(split["train"])
        total = 0.0
        for i in range(0, order.size, args.batch_size):
            idx = order[i:i + args.batch_size]
            x, m = _batch(seqs, idx)
            loss = loss_fn(model(x, m), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss) * idx.size
        model.eval()
        with torch.no_grad():
            val = float(loss_fn(model(xv, mv), yt[val_idx]))
        history.append({"train": total / order.size, "val": val})
        if val < best - 1e-6:
            best, bad = val, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
            if bad >= args.patience:
                break
    model.load_state_dict(best_state)
    return model.eval(), history


@torch.no_grad()
def predict(model: FailurePredictor, seqs) -> np.ndarray:
    return np.array([model.prob(s) for s in seqs])


def test_scores(y: np.ndarray, p: np.ndarray, seed: int) -> dict:
    """The held-out numbers of metrics.json: AUROC with its bootstrap 95% CI
    (None with one class) and ECE with its CI (see stats.score_heads)."""
    if not y.size:  # no test problems: nothing to score
        return dict.fromkeys(("auroc_test", "auroc_test_ci95", "ece_test", "ece_test_ci95"))
    s = score_heads(y.astype(bool), {"head": p}, seed)["head"]
    return {"auroc_test": s.get("auroc"), "auroc_test_ci95": s.get("auroc_ci95"),
            "ece_test": s["calibration"]["ece"], "ece_test_ci95": s.get("ece_ci95")}


def fit_baselines(seqs, y, split, seed: int) -> dict[str, dict]:
    """L1 logistic regression on the last position and on the mean over
    positions, and `length`: the number of positions read (the prompt's or the
    answer's length), unfitted, as a failure score that costs nothing."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    views = {"l1_logreg_last_token": np.stack([s[-1].numpy() for s in seqs]),
             "l1_logreg_mean_pool": np.stack([s.mean(dim=0).numpy() for s in seqs])}
    out = {}
    for name, X in views.items():
        clf = make_pipeline(StandardScaler(), LogisticRegression(
            penalty="l1", solver="liblinear", C=0.1, class_weight="balanced", random_state=seed))
        clf.fit(X[split["train"]], y[split["train"]])
        p = clf.predict_proba(X)[:, 1]
        out[name] = {"p": p, "auroc_test": auroc(y[split["test"]], p[split["test"]])}
    lengths = np.array([len(s) for s in seqs], dtype=float)
    out["length"] = {"p": lengths, "auroc_test": auroc(y[split["test"]], lengths[split["test"]])}
    return out


def plot_roc(y, probs, baselines, split, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    te = split["test"]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    if np.unique(y[te]).size == 2:
        curves = {"attention-pool MLP": probs, **{k: v["p"] for k, v in baselines.items()}}
        for name, p in curves.items():
            fpr, tpr, _ = roc_curve(y[te], p[te])
            ax.plot(fpr, tpr, label=f"{name} (AUROC {auroc(y[te], p[te]):.2f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"Failure predictor, {te.size} held-out problems")
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_history(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([h["train"] for h in history], label="train")
    ax.plot([h["val"] for h in history], label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("BCE")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
