"""The shape of a model a steering profile fits (layers, MLP width, hidden
size, architecture) and the rule for which models it fits."""

from __future__ import annotations

from dataclasses import dataclass

_SHAPE_INTS = ("num_layers", "intermediate_size", "hidden_size")


class ProfileError(ValueError):
    """A steering profile is unusable. The message names the file (when known),
    the problem, and the fix where there is one."""


@dataclass(frozen=True)
class ModelShape:
    architecture: str
    num_layers: int
    intermediate_size: int
    hidden_size: int

    @classmethod
    def from_hf_config(cls, config) -> ModelShape:
        """From a transformers PretrainedConfig (or any object/dict with
        .architectures/.num_hidden_layers/.intermediate_size/.hidden_size).
        Multimodal configs: the sizes are read from .text_config when it has them."""

        def get(obj, key):
            if obj is None:
                return None
            return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)

        text = get(config, "text_config")

        def pick(key):
            for src in (text, config):
                value = get(src, key)
                if value is not None:
                    return value
            raise ProfileError(f"cannot read the model shape: the model config has no '{key}'")

        archs = get(config, "architectures") or get(text, "architectures") or []
        return cls(
            architecture=str(archs[0]) if archs else "",
            num_layers=int(pick("num_hidden_layers")),
            intermediate_size=int(pick("intermediate_size")),
            hidden_size=int(pick("hidden_size")),
        )

    @staticmethod
    def _norm_arch(name: str) -> str:
        name = name.strip().lower()
        return name[len("steered"):] if name.startswith("steered") else name

    def compatible_with(self, other: ModelShape) -> bool:
        """Sizes equal; architectures equal case-insensitively ignoring a 'Steered'
        prefix, and an empty architecture (unknown) matches anything."""
        if (self.num_layers, self.intermediate_size, self.hidden_size) != (
            other.num_layers,
            other.intermediate_size,
            other.hidden_size,
        ):
            return False
        a, b = self._norm_arch(self.architecture), self._norm_arch(other.architecture)
        return not a or not b or a == b

    def describe(self) -> str:
        return (
            f"{self.architecture or '<unknown architecture>'} (num_layers={self.num_layers}, "
            f"intermediate_size={self.intermediate_size}, hidden_size={self.hidden_size})"
        )


def _shape_problem(shape) -> str | None:
    if not isinstance(shape, ModelShape):
        return f"model must be a ModelShape, got {type(shape).__name__}"
    if not isinstance(shape.architecture, str):
        return "model 'architecture' must be a string"
    for key in _SHAPE_INTS:
        value = getattr(shape, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            return f"model '{key}' must be a positive integer, got {value!r}"
    return None
