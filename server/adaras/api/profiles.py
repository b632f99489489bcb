"""The server's profile registry and the `/v1/steering/profiles` router.

The registry mirrors what the engine workers hold. Loading validates the file
here first (a profile for another model is a 400), then loads it into every
worker through `collective_rpc`, then swaps the entry. Each request resolves
its profile once, at admission, and carries the profile's *version* (sha256
of the file) to the engine, so a request in flight finishes on the profile it
started with even if the name is reloaded or unloaded meanwhile.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Header, HTTPException, Request
from starlette.datastructures import UploadFile

from adaras.api.auth import bearer_token, key_digests, key_matches
from adaras.api.glue import engine_rpc, plugin_off_reason
from adaras.api.protocol import ProfileInfo, ProfileList, ProfileLoad, RuntimeStats
from adaras.profile import (
    PROFILE_NAME_PATTERN,
    ModelShape,
    ProfileError,
    SteeringProfile,
    valid_profile_name,
)
from adaras.steering import Resolved, SteeringConfigError, parse_steering, resolve, unknown_profile


class SteeringError(ValueError):
    """Bad `steering` in a request: HTTP 400 naming `param`."""

    status = 400
    error_type = "BadRequestError"  # the OpenAI error body's `type`
    metric_kind = "bad_request"  # adaras_errors_total{type=...}

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class SteeringUnavailable(SteeringError):
    """The start-up probe found that steering does not work: HTTP 503."""

    status = 503
    error_type = "ServiceUnavailableError"
    metric_kind = "unavailable"


@dataclass
class Entry:
    profile: SteeringProfile
    version: str
    source: str
    upload: Path | None = None  # the stored upload, deleted when the entry goes


def check_name(name: str) -> str:
    if not valid_profile_name(name):
        raise ProfileError(f"profile name {name!r} must match {PROFILE_NAME_PATTERN} "
                           "(letters, digits, '.', '_', '-'; no paths)")
    return name


class ProfileRegistry:
    def __init__(self, engine, shape: ModelShape, upload_dir: Path, default_mode: str = "off"):
        self.engine = engine
        self.shape = shape
        self.upload_dir = upload_dir
        self.default_mode = default_mode
        self.entries: dict[str, Entry] = {}
        self.default: str | None = None
        self.unavailable: str | None = None  # why steering is refused (start-up probe)
        self._lock = asyncio.Lock()

    # ---- admission ---------------------------------------------------------
    def resolve(self, raw) -> Resolved:
        """Validate a request's raw `steering` value; raises SteeringError."""
        try:
            req = parse_steering(raw, default_mode=self.default_mode)
            if not req.engaged:
                return Resolved()
            self._check_available()
            name = req.profile or self.default
            entry = self.entries.get(name) if name is not None else None
            if entry is None:
                raise unknown_profile(name, self.entries)
            prof = entry.profile
            if req.mode == "adaptive" and prof.predictor is None:
                raise SteeringConfigError(
                    "mode", f"profile {name!r} has no failure predictor; use mode 'always'")
            if req.answer_probe and prof.answer_predictor is None:
                raise SteeringConfigError(
                    "answer_probe", f"profile {name!r} has no answer head (train one with "
                    "`adaras train-predictor --target answer`)")
        except SteeringConfigError as e:
            raise SteeringError(e.param, str(e)) from None
        return resolve(req, profile=name, default_alpha=prof.default_alpha,
                       profile_threshold=prof.threshold, neurons=prof.k, version=entry.version,
                       prompt_positions=prof.steered_prompt_positions)

    # ---- management --------------------------------------------------------
    def info(self, name: str) -> ProfileInfo:
        entry = self.entries[name]
        s = entry.profile.summary()
        return ProfileInfo(
            name=name, k=s["k"], default_alpha=s["default_alpha"], threshold=s["threshold"],
            model=s["model"], provenance=s["provenance"], layer_histogram=s["layer_histogram"],
            has_predictor=s["has_predictor"], has_answer_predictor=s["has_answer_predictor"],
            dose_in_sigma=s["dose_in_sigma"], fingerprint=entry.version,
            default=name == self.default, source=entry.source)

    def _check_available(self) -> None:
        if self.unavailable:
            raise SteeringUnavailable("steering", f"steering is unavailable on this server: "
                                                  f"{self.unavailable}")

    async def load(self, name: str, path: str | Path, *, default: bool = False,
                   source: str | None = None, upload: bool = False) -> ProfileInfo:
        """Validate `path` (one read, off the event loop; ProfileError -> 400),
        load it into every worker and swap the entry. `upload`: the file is
        the server's own copy of an upload, deleted with its entry."""
        self._check_available()
        check_name(name)
        path = Path(path)
        profile, version = await asyncio.to_thread(SteeringProfile.read, path, self.shape)
        async with self._lock:
            await engine_rpc(self.engine, "load_profile", name, str(path))
            old = self.entries.get(name)
            self.entries[name] = Entry(profile, version, source or str(path),
                                       path if upload else None)
            if old is not None:
                self._forget_upload(old)
            if default or self.default is None:
                self.default = name
                await engine_rpc(self.engine, "set_default_profile", name)
        return self.info(name)

    async def unload(self, name: str) -> None:
        self._check_available()
        async with self._lock:
            if name not in self.entries:
                raise KeyError(name)
            await engine_rpc(self.engine, "unload_profile", name)
            self._forget_upload(self.entries.pop(name))
            if self.default == name:
                self.default = next(iter(self.entries), None)
                await engine_rpc(self.engine, "set_default_profile", self.default)

    def _forget_upload(self, entry: Entry) -> None:
        """Delete an entry's stored upload once no entry uses the file (the
        workers hold the profile itself in memory, so requests in flight on it
        are unaffected)."""
        if entry.upload is not None and all(e.upload != entry.upload
                                            for e in self.entries.values()):
            entry.upload.unlink(missing_ok=True)


# ---- router ------------------------------------------------------------------

def get_registry(request: Request) -> ProfileRegistry:
    return request.app.state.adaras_profiles


def require_admin(request: Request, x_admin_key: Annotated[str | None, Header()] = None) -> None:
    admin_key = request.app.state.adaras_settings.admin_key
    if admin_key is None:
        raise HTTPException(403, "profile management is disabled: start the server with "
                                 "--admin-key (or ADARAS_ADMIN_KEY)")
    given = x_admin_key or bearer_token(request.scope["headers"])
    if not key_matches(given, key_digests(admin_key)):
        raise HTTPException(401, "this endpoint needs the admin key "
                                 "(Authorization: Bearer <admin key> or X-Admin-Key)")


RegistryDep = Annotated[ProfileRegistry, Depends(get_registry)]
AdminDep = Annotated[None, Depends(require_admin)]

router = APIRouter(prefix="/v1/steering/profiles", tags=["steering"])
runtime_router = APIRouter(prefix="/v1/steering", tags=["steering"])


@runtime_router.get("/runtime", response_model=RuntimeStats)
async def runtime_stats(registry: RegistryDep, _: AdminDep) -> RuntimeStats:
    """The engine worker's steering tables (rank 0): requests and captures in
    flight, reports not yet read, loaded profiles, and how often the steering
    op ran. When the engine is idle, `requests` and `captures` are 0. Needs the
    admin key."""
    if (reason := plugin_off_reason()) is not None:
        raise HTTPException(503, reason)
    stats = await engine_rpc(registry.engine, "stats")
    return RuntimeStats(**stats, unavailable=registry.unavailable)


@router.get("", response_model=ProfileList)
async def list_profiles(registry: RegistryDep) -> ProfileList:
    """List the loaded steering profiles with their metadata."""
    return ProfileList(default=registry.default,
                       data=[registry.info(n) for n in sorted(registry.entries)])


@router.get("/{name}", response_model=ProfileInfo)
async def show_profile(name: str, registry: RegistryDep) -> ProfileInfo:
    """One profile: metadata, layer histogram, provenance, predictor presence."""
    if name not in registry.entries:
        raise HTTPException(404, f"unknown profile {name!r}")
    return registry.info(name)


@router.post("", response_model=ProfileInfo, status_code=201)
async def load_profile(request: Request, registry: RegistryDep, _: AdminDep) -> ProfileInfo:
    """Load (or atomically replace) a profile. Body: JSON `{"name", "path",
    "default"}` naming a file on the server, or multipart form fields `name`,
    `file` (the .safetensors upload) and optional `default`. Needs the admin key."""
    content_type = request.headers.get("content-type", "")
    try:
        if content_type.startswith("multipart/form-data"):
            return await _load_upload(request, registry)
        body = ProfileLoad.model_validate(await request.json())
        return await registry.load(body.name, body.path, default=body.default)
    except SteeringUnavailable as e:
        raise HTTPException(503, str(e)) from None
    except ProfileError as e:
        raise HTTPException(400, str(e)) from None
    except ValueError as e:  # pydantic / JSON errors
        raise HTTPException(400, str(e)) from None


# multipart framing and the small form fields around the file
UPLOAD_OVERHEAD = 64 * 1024


async def _limited(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The request body, refused with a 413 as soon as it passes `limit` bytes
    (before it is held anywhere)."""
    seen = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > limit:
            raise HTTPException(413, "upload larger than the server's max_upload_mb")
        yield chunk


async def _load_upload(request: Request, registry: ProfileRegistry) -> ProfileInfo:
    from starlette.formparsers import MultiPartParser

    settings = request.app.state.adaras_settings
    limit = int(settings.max_upload_mb * 2**20)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + UPLOAD_OVERHEAD:
        raise HTTPException(413, f"upload larger than the server's max_upload_mb "
                                 f"({settings.max_upload_mb:g} MB)")
    form = await MultiPartParser(request.headers, _limited(request, limit + UPLOAD_OVERHEAD),
                                 max_files=1, max_fields=4).parse()
    try:
        name, upload = form.get("name"), form.get("file")
        if not isinstance(name, str) or not isinstance(upload, UploadFile):
            raise HTTPException(400, "multipart upload needs fields `name` and `file`")
        check_name(name)
        if upload.size is not None and upload.size > limit:
            raise HTTPException(413, f"profile larger than {settings.max_upload_mb:g} MB")
        registry.upload_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=registry.upload_dir, suffix=".safetensors",
                                         delete=False) as f:
            while chunk := await upload.read(1 << 20):
                f.write(chunk)
        default = str(form.get("default", "false")).lower() in ("1", "true", "yes")
        filename = upload.filename
    finally:
        await form.close()
    tmp = Path(f.name)
    try:  # refuse a bad file before it replaces anything
        _, version = await asyncio.to_thread(SteeringProfile.read, tmp, registry.shape)
        final = registry.upload_dir / f"{name}.{version}.safetensors"
        tmp.replace(final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return await registry.load(name, final, default=default, source=f"upload:{filename}",
                               upload=True)


@router.delete("/{name}", status_code=204)
async def unload_profile(name: str, registry: RegistryDep, _: AdminDep) -> None:
    """Unload a profile. Requests already running on it finish on it. Needs the admin key."""
    try:
        await registry.unload(name)
    except SteeringUnavailable as e:
        raise HTTPException(503, str(e)) from None
    except KeyError:
        raise HTTPException(404, f"unknown profile {name!r}") from None

