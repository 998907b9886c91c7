"""The class our single ``vllm.logits_processors`` entry point names.

vLLM loads every entry in that group, and each model runner checks the class against its own
interface: V1 (``vllm.v1.sample.logits_processor.LogitsProcessor``) and Model Runner V2
(``vllm.v1.worker.gpu.sample.logits_processor.LogitsProcessor``) each reject the other's. So the class
named here subclasses both interfaces (both loaders accept it), and constructing it returns the adapter
of the runner that calls: V1 constructs with ``(vllm_config, device, is_pin_memory)``, V2 with
``(vllm_config, req_states)``, a ``LogitsProcRequestState``. The class itself is never instantiated.

On a vLLM without Model Runner V2 it subclasses the V1 interface only.
"""

from __future__ import annotations

from typing import Any

from vllm.v1.sample.logits_processor import LogitsProcessor as _V1Interface

try:  # Model Runner V2's interface (vLLM >= 0.1x); absent in older releases
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as _V2Interface
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcRequestState as _V2State
except ImportError:  # pragma: no cover - depends on the installed vLLM
    _V2Interface = None
    _V2State = None

_INTERFACES: tuple[type, ...] = (_V1Interface,) if _V2Interface is None else (_V1Interface, _V2Interface)


class DistillGuardLogitsProcessor(*_INTERFACES):  # type: ignore[misc]
    """Resolves to ``V1LogitsProcessor`` or ``V2LogitsProcessor`` at construction."""

    def __new__(cls, vllm_config: Any, *args: Any, **kwargs: Any) -> Any:
        if _V2State is not None and len(args) + len(kwargs) == 1:
            state = args[0] if args else next(iter(kwargs.values()))
            if isinstance(state, _V2State):
                from .v2 import V2LogitsProcessor

                return V2LogitsProcessor(vllm_config, state)
        from .v1 import V1LogitsProcessor

        return V1LogitsProcessor(vllm_config, *args, **kwargs)

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        """Accept every request: a missing or bad profile means the default profile, not a refusal."""
        return None
