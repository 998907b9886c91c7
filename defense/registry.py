"""Defense type names -> classes.

Three sources, checked at load with the valid list on a miss:
- the built-in table below (lazy: a type's module is imported only when a config names it);
- entry points in the ``distillguard.defenses`` group, for defenses shipped by other distributions;
- ``module:Class`` strings, for a class nobody registered.
Every class is checked to be a subclass of one of the three defense interfaces.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from importlib.metadata import entry_points

from .base import DEFENSE_KINDS, Defense
from .errors import ConfigError
from .schema import suggest

ENTRY_POINT_GROUP = "distillguard.defenses"

# type name -> "module:Class"; modules are imported on first use so a config that only throttles
# never imports torch.
BUILTIN: Mapping[str, str] = {
    "request_rules": "defense.rules:RequestRules",
    "budget": "defense.throttle.budget:Budget",
    # in-engine watermarks (sampling defenses); the sidecar's Detect and `distillguard detect` read them too
    "watermark": "defense.watermark.kgw:GreenListWatermark",  # KGW green list: the anti-distillation mark
    "watermark_gumbel": "defense.watermark.gumbel:GumbelWatermark",  # Gumbel-max: distortion-free provenance
    "keyed_noise": "defense.perturbation.keyed:KeyedNoise",
    "random_noise": "defense.perturbation.random_noise:RandomNoise",
    "top_k_cap": "defense.perturbation.cap:TopKCap",
    "top1_only": "defense.perturbation.top1:Top1Only",
    "quantize": "defense.perturbation.quantize:Quantize",
    "temperature": "defense.perturbation.temperature:Temperature",
    "reverse_sigmoid": "defense.perturbation.reverse_sigmoid:ReverseSigmoid",
    "targeted": "defense.perturbation.targeted:Targeted",
    "antidistill": "defense.antidistill.sampler:AntidistillSampling",
}


def import_object(ref: str) -> object:
    module, sep, attr = ref.partition(":")
    if not sep or not module or not attr:
        raise ConfigError(f"{ref!r} is not of the form 'package.module:Class'")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"cannot import module {module!r} for {ref!r}: {e}") from None
    obj: object = mod
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"module {module!r} has no attribute {attr!r}") from None
    return obj


def check_defense_class(obj: object, ref: str) -> type[Defense]:
    if not isinstance(obj, type) or not issubclass(obj, DEFENSE_KINDS):
        kinds = ", ".join(k.__name__ for k in DEFENSE_KINDS)
        raise ConfigError(f"{ref!r} resolves to {obj!r}, which is not a subclass of one of {kinds}")
    return obj


class Registry:
    """Resolves type names; results are cached so a hot reload does not re-import."""

    def __init__(self, builtin: Mapping[str, str] = BUILTIN, *, group: str | None = ENTRY_POINT_GROUP) -> None:
        self._refs: dict[str, str] = dict(builtin)
        self._classes: dict[str, type[Defense]] = {}
        if group is not None:
            for ep in entry_points(group=group):
                # a built-in of the same name wins: a third-party package cannot shadow a defense
                self._refs.setdefault(ep.name, ep.value)

    def register(self, name: str, cls: type[Defense]) -> None:
        if name in self._refs or name in self._classes:
            raise ValueError(f"defense type {name!r} is already registered")
        self._classes[name] = check_defense_class(cls, name)

    @property
    def known(self) -> list[str]:
        return sorted(set(self._refs) | set(self._classes))

    def resolve(self, type_name: str) -> type[Defense]:
        if type_name in self._classes:
            return self._classes[type_name]
        if ":" in type_name:
            cls = check_defense_class(import_object(type_name), type_name)
        elif type_name in self._refs:
            cls = check_defense_class(import_object(self._refs[type_name]), type_name)
        else:
            raise ConfigError(
                f"unknown defense type {type_name!r}{suggest(type_name, self.known)}; "
                f"known: {', '.join(self.known)} (or 'package.module:Class')"
            )
        self._classes[type_name] = cls
        return cls


_DEFAULT: Registry | None = None


def default_registry() -> Registry:
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = Registry()
    return _DEFAULT
