"""distillguard's policy core: defenses against distillation, their chain, config and keys.

``import defense`` needs neither gRPC nor an inference engine; ``defense.sidecar`` adds the gRPC
server and ``defense.models`` the small-model factory (torch, transformers).
"""

from importlib.metadata import PackageNotFoundError, version

from .base import AdmissionDefense, Defense, Deps, Mode, OnError, ResponseDefense, SamplingDefense
from .chain import Admission, ChainEntry, DefenseChain, Protected
from .clock import FakeClock, SystemClock
from .config import Config, LoadedConfig, load_config, parse_config
from .errors import ConfigError, DefenseFailure, DistillGuardError, InvalidInput, KeyFileError
from .keys import KeyRing
from .metrics import Metrics
from .registry import Registry
from .types import (
    Api,
    ChatMessage,
    Cost,
    Decision,
    Detection,
    LogprobBatch,
    LogprobsMode,
    OutputKind,
    Prompt,
    RequestContext,
    Rewrites,
    SettleStatus,
    Usage,
    Verdict,
)

try:
    __version__ = version("distillguard")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+local"

__all__ = [
    "Admission", "AdmissionDefense", "Api", "ChainEntry", "ChatMessage", "Config", "ConfigError", "Cost",
    "Decision", "Defense", "DefenseChain", "DefenseFailure", "Deps", "Detection", "DistillGuardError",
    "FakeClock", "InvalidInput", "KeyFileError", "KeyRing", "LoadedConfig", "LogprobBatch", "LogprobsMode",
    "Metrics", "Mode", "OnError", "OutputKind", "Prompt", "Protected", "Registry", "RequestContext",
    "ResponseDefense", "Rewrites", "SamplingDefense", "SettleStatus", "SystemClock", "Usage", "Verdict",
    "load_config", "parse_config", "__version__",
]
