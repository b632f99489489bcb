"""Assemble and run the server: vLLM's OpenAI app (chat, completions, models,
health, metrics, tokenizer endpoints) plus our profile router and middleware.

Nothing here re-implements an OpenAI endpoint; see `middleware.py` for what the
`steering` extension adds on the way in and out.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from starlette.middleware import Middleware

from adaras.api import glue
from adaras.api.auth import ApiKeyMiddleware
from adaras.api.kv_cache import size_kv_cache
from adaras.api.middleware import STEERED_PATHS, SteeringMiddleware
from adaras.api.profiles import ProfileRegistry, runtime_router
from adaras.api.profiles import router as profiles_router
from adaras.api.settings import DEFAULT_MODEL, Settings
from adaras.api.starting import Starting
from adaras.engine import seam
from adaras.engine.dtype import cpu_without_native_bf16, given, serve_float32
from adaras.engine.reports import MAILBOX
from adaras.profile import ModelShape

logger = logging.getLogger("adaras.api")

# Engine flags we set unless the user passes them after `--`.
# SIGTERM drains requests in flight for up to 30 s.
DEFAULT_FLAGS = {"--shutdown-timeout": "30"}
# SmolLM2-135M-Instruct knows 8192 positions; chat with it rarely needs more than
# 2048, and 64 sequences of 2048 tokens need 2.8 GiB of KV in bf16 (5.6 in float32),
# not 8+.
DEFAULT_MODEL_FLAGS = {"--max-model-len": "2048", "--max-num-seqs": "64"}
def vllm_args(settings: Settings, model_path: str, passthrough: list[str]) -> argparse.Namespace:
    """vLLM's own serve arguments: ours first, then any engine flags passed through."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog="adaras serve"))
    argv = ["--model", model_path, "--host", settings.host, "--port", str(settings.port),
            "--served-model-name", settings.model_name]
    defaults = dict(DEFAULT_FLAGS)
    if settings.model == DEFAULT_MODEL:  # a small model: a small, sufficient KV cache
        defaults.update(DEFAULT_MODEL_FLAGS)
    for flag, value in defaults.items():  # given twice, vLLM would warn "duplicate keys"
        if not given(flag, passthrough):
            argv += [flag, value]
    argv += passthrough
    args = parser.parse_args(argv)
    # "auto" left as it was (no --dtype on the command line or in a --config file)
    if serve_float32(args.dtype, args.quantization, passthrough, model_path,
                     lambda: cpu_without_native_bf16()):  # looked up here: tests replace it
        args.dtype = "float32"
        logger.info("adaras: this CPU has no native bf16 (AVX512-BF16 or AMX), so the engine "
                    "runs in float32, several times faster here than emulated bf16; "
                    "`-- --dtype bfloat16` overrides")
    validate_parsed_serve_args(args)
    return args


async def build_app(settings: Settings, args: argparse.Namespace, engine):
    """The FastAPI app around a running engine client."""
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.app import build_app as build_vllm_app

    seam.patch_openai_requests()
    supported_tasks = await engine.get_supported_tasks()
    app = build_vllm_app(args, supported_tasks, engine.model_config)
    await init_app_state(engine, app.state, args, supported_tasks)

    shape = ModelShape.from_hf_config(engine.model_config.hf_config)
    upload_dir = Path(settings.profile_dir or Path(os.environ.get("ADARAS_CACHE", Path.home() /
                                                                   ".cache/adaras")) / "uploads")
    registry = ProfileRegistry(engine, shape, upload_dir, settings.default_mode)
    registry.unavailable = glue.plugin_off_reason()
    if registry.unavailable is None:
        for name, path in settings.profiles.items():
            await registry.load(name, path, default=name == settings.default_profile)
        registry.unavailable = await glue.probe_steering(engine, registry)
    # From here on, steering reaches the engine only through the middleware's
    # admission (the probe above was the server's own request).
    MAILBOX.enforced = True
    app.state.adaras_profiles = registry
    app.state.adaras_settings = settings
    app.include_router(profiles_router)
    app.include_router(runtime_router)
    if registry.unavailable:
        logger.error("adaras: steering disabled, requests that ask for it get 503: %s",
                     registry.unavailable)
    else:
        logger.info("adaras: start-up probe: the steering op ran; %s",
                    glue.compiled_graphs_note(await glue.engine_rpc(engine, "stats")))
    # Outermost first: auth, then steering, then vLLM's own middleware. vLLM
    # has already built the middleware stack, so insert and let it rebuild.
    app.user_middleware[:0] = [
        Middleware(ApiKeyMiddleware, api_key=settings.api_key, admin_key=settings.admin_key,
                   model=settings.model_name),
        Middleware(SteeringMiddleware, registry=registry, model=settings.model_name,
                   max_body_bytes=int(settings.max_body_mb * 2**20),
                   max_response_bytes=int(settings.max_response_mb * 2**20)),
    ]
    app.middleware_stack = None
    document_steering(app)
    return app


# vLLM's request schemas that the steering middleware extends (its routes are
# middleware.STEERED_PATHS, defined once there)
STEERED_REQUESTS = ("ChatCompletionRequest", "CompletionRequest")


def document_steering(app) -> None:
    """Put the `steering` extension into /openapi.json: the request field of
    chat and completions (protocol.SteeringParams), and the report in their
    JSON 200 response (protocol.SteeringReport; vLLM documents no schema for
    that response, so ours names only the `steering` field and allows the
    rest)."""
    from adaras.api.protocol import SteeringParams, SteeringReport

    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        refs = {}
        for model in (SteeringParams, SteeringReport):
            name = model.model_config["title"]
            components[name] = model.model_json_schema(
                ref_template="#/components/schemas/{model}")
            components.update(components[name].pop("$defs", {}))  # e.g. ChoiceReport
            refs[model] = {"$ref": f"#/components/schemas/{name}"}
        for target in STEERED_REQUESTS:
            if target in components:
                components[target].setdefault("properties", {})["steering"] = refs[SteeringParams]
        for path in STEERED_PATHS:
            ok = schema.get("paths", {}).get(path, {}).get("post", {}).get("responses", {}) \
                .get("200")
            if ok is not None:
                body = ok.setdefault("content", {}).setdefault("application/json", {})
                if not body.get("schema"):
                    body["schema"] = {"type": "object", "additionalProperties": True,
                                      "properties": {"steering": refs[SteeringReport]}}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi


class ClientErrorsAtInfo(logging.Filter):
    """vLLM logs a request for an unknown model (a 404 its client gets) at
    ERROR. Operators alert on ERROR lines, which should mean a fault of the
    server, so such client errors are logged at INFO."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.ERROR and record.msg == "Error with model %s" \
                and record.args:
            code = getattr(getattr(record.args[0], "error", None), "code", None)
            if isinstance(code, int) and 400 <= code < 500:
                record.levelno, record.levelname = logging.INFO, "INFO"
        return True


# vLLM modules that log a client's 4xx as "Error with model" (vLLM reconfigures its
# handlers at start-up, so the filter sits on these loggers, which it leaves alone).
CLIENT_ERROR_LOGGERS = ("vllm.entrypoints.openai.chat_completion.serving",
                        "vllm.entrypoints.openai.chat_completion.batch_serving",
                        "vllm.entrypoints.openai.responses.serving")


def quiet_client_errors() -> None:
    for name in CLIENT_ERROR_LOGGERS:
        log = logging.getLogger(name)
        if not any(isinstance(f, ClientErrorsAtInfo) for f in log.filters):
            log.addFilter(ClientErrorsAtInfo())


def engine_args(settings: Settings, passthrough: list[str]) -> argparse.Namespace:
    """The engine arguments `adaras serve` starts vLLM with (the plugin
    registered, the model resolved, our defaults then the flags after `--`,
    the KV cache sized), and the compile cache noted in the log. `serve` and
    `adaras serve --prepare-only` (adaras.warmup) both build them here: the
    prepared graphs load only under the same configuration hash."""
    from adaras.engine import plugin
    from adaras.zoo import resolve_model

    plugin.register()  # also seam.patch_compile_cache: the per-CPU VLLM_CACHE_ROOT
    model_path = str(resolve_model(settings.model))
    args = vllm_args(settings, model_path, passthrough)
    size_kv_cache(args)  # CPU: raises KvCacheTooSmall before the engine starts
    logger.info("adaras: %s", glue.compile_cache_note())
    return args


async def serve(settings: Settings, passthrough: list[str]) -> None:
    """Start the engine, build the app, serve until SIGINT/SIGTERM, then drain."""
    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
    from vllm.entrypoints.launchers.launcher import serve_http, setup_server

    quiet_client_errors()
    args = engine_args(settings, passthrough)
    listen_address, sock = setup_server(args, reuse_port=False)
    # Until the app serves, every request (/health included) gets a 503 saying what
    # the server is doing (api.starting), instead of waiting unanswered.
    starting = Starting(sock, glue.starting_phase(glue.stored_graphs()))
    logger.info("adaras: %s answers 503 {\"status\": \"starting\", \"phase\": ...} until "
                "the engine is up", listen_address)
    try:
        async with build_async_engine_client(args) as engine:
            starting.set_phase("starting the steering API: profiles and the start-up probe")
            app = await build_app(settings, args, engine)
            starting.stop()
            logger.info("adaras: serving %s on %s (default steering mode %s, profiles %s)",
                        settings.model_name, listen_address, settings.default_mode,
                        sorted(app.state.adaras_profiles.entries))
            shutdown_task = await serve_http(
                app, sock=sock, host=args.host, port=args.port,
                log_level=args.uvicorn_log_level,
                access_log=not args.disable_uvicorn_access_log)
    finally:
        starting.stop()  # the engine failed to start: stop answering, then exit
    try:
        await shutdown_task
    finally:
        sock.close()
