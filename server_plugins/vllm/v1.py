"""Adapter for vLLM's V1 model runner (``vllm.v1.sample.logits_processor.LogitsProcessor``).

vLLM calls ``update_state`` before each step with the batch's changes (removed, then added, then moved
indices) and ``apply`` with the batch's logits, one row per request in persistent-batch order. Added
requests carry their SamplingParams (``extra_args`` is ``vllm_xargs``), prompt ids and a live reference
to their output ids, so a row's prefix is a ``TokenView`` that never has to be rebuilt.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from .batch import BatchSlots, TokenView
from .core import engine_share

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig

ENTRY = "server_plugins.vllm.entry:DistillGuardLogitsProcessor"


def named_explicitly(vllm_config: VllmConfig) -> bool:
    """The plugin is in ``--logits-processors`` / ``LLM(logits_processors=...)``, not only an entry point."""
    named = getattr(getattr(vllm_config, "model_config", None), "logits_processors", None) or ()
    return any(item == ENTRY if isinstance(item, str) else getattr(item, "__module__", "").startswith(__package__)
               for item in named)


def check_output_ids_filled(vllm_config: VllmConfig) -> None:
    """Refuse to run on output-id lists that hold placeholders.

    With async scheduling (vLLM's default on GPU), the V1 runner appends -1 for each sampled token and
    writes the real ids into the lists only when it believes a logits processor reads them, which it
    infers from the processors named in ``--logits-processors``, not from entry points. Loaded by the
    entry point alone, the defenses would see -1 where the previous tokens should be (a watermark keyed
    on them would be undetectable), so the engine is stopped with the fix instead.
    """
    sched = getattr(vllm_config, "scheduler_config", None)
    if getattr(sched, "async_scheduling", False) and not named_explicitly(vllm_config):
        raise ValueError(
            "distillguard: with async scheduling the V1 runner gives logits processors the previous tokens "
            f"only when they are named explicitly: add --logits-processors {ENTRY} "
            "(the defenses still run once per step), or run with --no-async-scheduling")


class V1LogitsProcessor(LogitsProcessor):
    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        self.vllm_config = vllm_config  # held while the shared engine state lives (engine_share)
        self.share = engine_share(vllm_config)
        self.engine = self.share.engine
        if self.engine is not None:
            check_output_ids_filled(vllm_config)
        self.batch = BatchSlots()

    def is_argmax_invariant(self) -> bool:
        # vLLM runs argmax-invariant processors after temperature and skips them for greedy requests; the
        # defenses must see pre-temperature logits and may change greedy output, so an active plugin says
        # False. Inactive, True lets vLLM skip the (no-op) call for greedy batches.
        return self.engine is None

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if self.engine is None or batch_update is None:
            return  # no change of membership: the live output lists already hold the new tokens
        slots, engine = self.batch, self.engine
        for index in batch_update.removed:
            slots.remove(index)
        # vLLM's update API names requests one at a time; each is verified once, when it enters
        for index, params, prompt_ids, output_ids in batch_update.added:
            slots.put(index, engine.row(params.extra_args, temperature=params.temperature, seed=params.seed,
                                        prefix=TokenView(prompt_ids, output_ids)))
        for a, b, direction in batch_update.moved:
            if direction == MoveDirectionality.SWAP:
                slots.swap(a, b)
            else:
                slots.move(a, b)
        slots.resize(batch_update.batch_size)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.engine is None or logits.shape[0] == 0 or self.share.already_applied(logits):
            return logits
        if logits.shape[0] != self.batch.size:
            raise RuntimeError(f"distillguard: {logits.shape[0]} logits rows for a batch of {self.batch.size} "
                               "requests (speculative decoding is not supported by custom logits processors)")
        return self.share.applied(logits, self.engine.process(logits, self.batch.view(None, device=logits.device)))
