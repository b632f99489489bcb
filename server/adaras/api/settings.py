"""Server settings: one pydantic-settings class. Every field is also an
environment variable with the `ADARAS_` prefix (ADARAS_API_KEY, ...)."""

from __future__ import annotations

import ipaddress
import warnings
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from adaras.engine.config import parse_profiles_env
from adaras.profile import PROFILE_NAME_PATTERN, valid_profile_name
from adaras.steering import MODES

DEFAULT_MODEL = "smollm2-135m-instruct"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ADARAS_", extra="ignore")

    model: str = Field(DEFAULT_MODEL, description="HF model dir, hub id, or a known offline name")
    served_model_name: str | None = Field(None, description="name clients use; default: model")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    api_key: str | None = Field(
        None, description="Bearer key required on every route but health, ping, version, metrics "
                          "and the API docs, when set")
    admin_key: str | None = Field(None, description="key for loading/unloading profiles")
    default_mode: str = Field("off", description="steering mode for requests without `steering`")
    # NoDecode: ADARAS_PROFILES is "name=path,name=path", not JSON.
    profiles: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict, description="name -> profile path")
    default_profile: str | None = None
    default_profile_auto: bool = Field(
        True, description="serve the package's profile for a known model started by its name")
    profile_dir: str | None = Field(None, description="where uploaded profiles are stored")
    max_upload_mb: float = Field(64.0, gt=0, description="largest profile upload (413 above)")
    max_body_mb: float = Field(32.0, gt=0, description="largest JSON request body (413 above)")
    max_response_mb: float = Field(
        64.0, gt=0, description="largest non-streamed response the steering middleware holds "
                                "to add its report (larger ones are sent without it)")

    @field_validator("profiles", mode="before")
    @classmethod
    def _parse_profiles(cls, v):
        if isinstance(v, str):  # ADARAS_PROFILES="a=/p/a.safetensors,b=/p/b.safetensors"
            return parse_profiles_env(v)
        if isinstance(v, (list, tuple)):  # --profile a=/p/a --profile b=/p/b
            return parse_profiles_env(",".join(v))
        return v

    @field_validator("profiles")
    @classmethod
    def _check_profile_names(cls, v: dict[str, str]):
        for name in v:
            if not valid_profile_name(name):
                raise ValueError(f"profile name {name!r} must match {PROFILE_NAME_PATTERN} "
                                 "(no paths)")
        return v

    @field_validator("default_mode")
    @classmethod
    def _check_mode(cls, v: str):
        if v not in MODES:
            raise ValueError(f"default_mode must be one of {list(MODES)}, got {v!r}")
        return v

    @field_validator("api_key", "admin_key", mode="before")
    @classmethod
    def _empty_is_none(cls, v):
        return v or None

    @field_validator("api_key", "admin_key")
    @classmethod
    def _strong_enough(cls, v):
        if v is not None and len(v) < 8:
            raise ValueError("keys must be at least 8 characters")
        return v

    @model_validator(mode="after")
    def _check_exposure(self):
        if self.api_key and self.admin_key and self.api_key == self.admin_key:
            raise ValueError("admin_key must differ from api_key")
        try:
            loopback = ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            loopback = self.host == "localhost"
        if not loopback and not self.api_key:
            warnings.warn(f"serving on {self.host} without an API key: anyone who can reach "
                          "the port can use the model", stacklevel=2)
        return self

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model
