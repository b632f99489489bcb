"""`adaras eval`'s options, shared by its verbs (evaluate, eval_generate,
eval_score, eval_report)."""

from __future__ import annotations

from dataclasses import dataclass, field

MODES = ("baseline", "always", "adaptive", "minus", "random", "noise")


DEFAULT_MODES = ("baseline", "always", "adaptive", "random")


@dataclass


class EvalArgs:
    dataset: str = "rg:gsm_symbolic"
    problems: int = 100
    seed: int = 1  # != collect's seed: other problems
    difficulty: float | None = None
    options: dict | None = None
    modes: list[str] = field(default_factory=lambda: list(DEFAULT_MODES))
    alpha: float | None = None  # default: the profile's default_alpha
    alphas: list[float] = field(default_factory=list)  # sweep
    ks: list[int] = field(default_factory=list)  # sweep
    ablations: dict[str, str] = field(default_factory=dict)  # name -> profile path
    threshold: float | None = None  # default: the profile's calibrated threshold
    max_tokens: int = 512
    profile: str | None = None  # default: the run's train-predictor (else identify) profile
    stage: str = "eval"  # output folder; use another for a second benchmark (transfer)
    bootstrap: int = 10000
    screen: bool = False  # alpha screen: baseline + `alphas`, pick alpha* (see `screen`)
    primary: str | None = None  # pre-registered primary comparison: this config vs baseline
    noise_problems: int | None = None  # the noise arm's size (default: every problem)
    registration: dict | None = None  # the study's registration, written before generating
    answer_probe: bool = False  # every arm asks for the profile's answer head (no extra tokens)
    secondary: str | None = None  # "A,B": config A against config B, exact McNemar (paired)
    also_without: str | None = None  # problem ids (file): every comparison again without them
    logprobs: int | None = None  # top-k logprobs per answer token -> per-token confidence arrays
    knobs: str | None = None  # knobs.json (pipeline.knobs): DeepConf window and tail for scoring
