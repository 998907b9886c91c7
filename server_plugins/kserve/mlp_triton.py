"""Serve an MLP classifier on a real Triton server (nvidia-pytriton), for tests, benchmarks and demos.

Runs in the Triton venv (``.venvs/triton``: numpy<2, no torch, no distillguard): the weights come as an
``.npz`` exported from the model factory by ``server_plugins.kserve.triton.export_classifier``. Model
``NAME`` takes ``x`` FP32 [batch, in_dim] and returns ``probs`` (softmax), ``logprobs`` (log-softmax),
``logits`` (the raw scores a proxy must strip) and ``label`` (INT64 argmax).

    .venvs/triton/bin/python server_plugins/kserve/mlp_triton.py --weights mlp.npz --grpc-port 8001 \
        --http-port 8000 --workspace /tmp/pytriton

Prints ``READY <grpc port>`` once the model answers, then serves until SIGTERM or SIGINT.
Start it with the LD_LIBRARY_PATH fix (``triton.triton_env``): the Python backend stub links libpython,
which must resolve to this interpreter's, not the system's.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import signal
import sys
import threading
from pathlib import Path

import numpy as np


def load_layers(path: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(W [out, in] float32, b [out] float32), ...] in layer order, as exported."""
    data = np.load(path)
    n = int(data["n_layers"])
    return [(data[f"w{i}"].astype(np.float32), data[f"b{i}"].astype(np.float32)) for i in range(n)]


def forward(layers: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray) -> np.ndarray:
    """x: [B, in_dim] float32 -> logits [B, n_classes] float32 (Linear-ReLU stack, as MLPClassifier).

    Each row alone, accumulated in float64: a float32 matmul's last bits depend on the BLAS kernel, which
    depends on the batch size (and on threading), so the same input could come back in different bits alone
    and in a batch; Triton's answer for an input must not depend on its batch companions."""
    out = []
    for row in x.astype(np.float64):
        h = row[None, :]
        for i, (w, b) in enumerate(layers):
            h = h @ w.T.astype(np.float64) + b
            if i < len(layers) - 1:
                h = np.maximum(h, 0.0)
        out.append(h[0])
    return np.stack(out).astype(np.float32)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", required=True)
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--grpc-port", type=int, required=True)
    ap.add_argument("--http-port", type=int, required=True)
    ap.add_argument("--workspace", required=True, help="a fresh folder (the default is under ~/.cache)")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--server-log", default=None, help="tritonserver's own log file (default: pytriton keeps it)")
    args = ap.parse_args()
    # progress on stderr (pytriton's loggers say nothing by default), and every thread's stack on SIGUSR1:
    # a start that never gets ready can be told apart from a slow one
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    faulthandler.register(signal.SIGUSR1, all_threads=True)

    from pytriton.decorators import batch
    from pytriton.model_config import ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    layers = load_layers(args.weights)
    in_dim, classes = layers[0][0].shape[1], layers[-1][0].shape[0]

    @batch
    def infer(x: np.ndarray) -> dict[str, np.ndarray]:
        logits = forward(layers, x)  # [B, C]
        shifted = logits - logits.max(axis=-1, keepdims=True)
        logprobs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        return {"probs": np.exp(logprobs).astype(np.float32), "logprobs": logprobs.astype(np.float32),
                "logits": logits.astype(np.float32), "label": logits.argmax(axis=-1, keepdims=True).astype(np.int64)}

    config = TritonConfig(grpc_address="127.0.0.1", grpc_port=args.grpc_port, http_address="127.0.0.1",
                          http_port=args.http_port, allow_metrics=False,
                          log_file=Path(args.server_log) if args.server_log else None)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with Triton(config=config, workspace=args.workspace) as triton:
        triton.bind(model_name=args.model, infer_func=infer,
                    inputs=[Tensor(name="x", dtype=np.float32, shape=(in_dim,))],
                    # exact shapes: the proxy reserves the values an answer returns at admission
                    outputs=[Tensor(name="probs", dtype=np.float32, shape=(classes,)),
                             Tensor(name="logprobs", dtype=np.float32, shape=(classes,)),
                             Tensor(name="logits", dtype=np.float32, shape=(classes,)),
                             Tensor(name="label", dtype=np.int64, shape=(1,))],
                    config=ModelConfig(max_batch_size=args.max_batch))
        triton.run()
        print(f"READY {args.grpc_port}", flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
