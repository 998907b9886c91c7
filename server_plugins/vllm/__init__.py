"""vLLM plugin: distillguard's sampling defenses (watermark, antidistillation sampling) inside vLLM's sampler.

One core (``core``, ``batch``, ``xargs``: no vLLM import) and two thin adapters, ``v1`` (V1 model runner)
and ``v2`` (Model Runner V2), reached through the single ``vllm.logits_processors`` entry point
``entry:DistillGuardLogitsProcessor``. See README.md beside this file.
"""
