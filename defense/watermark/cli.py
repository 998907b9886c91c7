"""``distillguard detect``: test token sequences or texts for our watermark; JSON out.

Input (a file or stdin), one sequence per line: a JSON list of token ids, a JSON object with
``token_ids`` or ``text``, a JSON string, or a plain line of text. Text needs ``--tokenizer DIR``
(a local tokenizer folder, e.g. the served model's). The watermark's parameters and the key file
come from the config (``--config`` or DISTILLGUARD_CONFIG), or from flags.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

EXIT_BAD_INPUT = 2


def register(sub: Any) -> None:
    p = sub.add_parser("detect", help="test token ids or texts for the watermark (JSON lines in, JSON out)")
    p.add_argument("input", nargs="?", default="-", help="file with one sequence per line (default: stdin)")
    p.add_argument("--config", help="config with a watermark defense (default: DISTILLGUARD_CONFIG)")
    p.add_argument("--defense", default="", help="which configured watermark: its name or scheme (default: the first)")
    p.add_argument("--keys", help="key file (default: the config's keys.file or DISTILLGUARD_KEYS)")
    p.add_argument("--key-id", action="append", default=None, help="key id to try (repeatable; default: all)")
    p.add_argument("--tenant", default="", help="tenant, for a watermark with per_tenant keys")
    p.add_argument("--tokenizer", metavar="DIR", help="local tokenizer folder, to score lines of text")
    g = p.add_argument_group("without a config")
    g.add_argument("--scheme", choices=("kgw", "gumbel"), default="kgw")
    g.add_argument("--gamma", type=float, default=0.25)
    g.add_argument("--context", type=int, default=1, help="h, the previous tokens that seed the PRF")
    g.add_argument("--hashing", choices=("lefthash", "selfhash"), default="lefthash")
    g.add_argument("--min-tokens", type=int, default=16)
    g.add_argument("--detection-p", type=float, default=1e-6)
    g.add_argument("--vocab-size", type=int, default=None, help="reject ids at or above it (default: tokenizer size)")
    p.set_defaults(func=run)


def _detector(args: argparse.Namespace) -> Any:
    from ..config import load_config
    from ..errors import ConfigError
    from ..keys import KeyRing
    from ..runtime import load_keys
    from ..settings import read_environment
    from .base import WatermarkDefense, spec_from_params
    from .detect import DetectorSpec

    config = args.config or read_environment().config_path
    loaded = load_config(config) if config else None
    if loaded is not None:
        found = [b for b in loaded.defenses if issubclass(b.cls, WatermarkDefense)
                 and (not args.defense or args.defense in (b.name, b.cls.scheme))]
        if not found:
            raise ConfigError(f"{config} configures no watermark{' matching ' + repr(args.defense) if args.defense else ''}"
                              " (type: watermark or watermark_gumbel)")
        spec = spec_from_params(found[0].cls.scheme, found[0].params)
        tenant = args.tenant if found[0].params.per_tenant else ""
    else:
        try:
            spec = DetectorSpec(scheme=args.scheme, context=args.context, hashing=args.hashing, gamma=args.gamma,
                                vocab_size=args.vocab_size, min_tokens=args.min_tokens, detection_p=args.detection_p)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        tenant = args.tenant
    if args.keys:
        ring = KeyRing.load(args.keys)
    elif loaded is not None:
        ring = load_keys(loaded)
    elif read_environment().keys_path:
        ring = KeyRing.load(read_environment().keys_path)
    else:
        raise ConfigError("give --config (with keys.file), --keys FILE, or set DISTILLGUARD_KEYS")
    return spec, ring, tenant


def _sequences(lines: list[str], tokenizer: Any) -> list[list[int]]:
    from ..errors import InvalidInput

    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item: Any = json.loads(line)
        except json.JSONDecodeError:
            item = line.rstrip("\n")
        if isinstance(item, dict):
            if "token_ids" in item:
                item = item["token_ids"]
            elif "text" in item:
                item = item["text"]
            else:
                raise InvalidInput(f"line {n}: a JSON object needs 'token_ids' or 'text'")
        if isinstance(item, str):
            if tokenizer is None:
                raise InvalidInput(f"line {n} is text; pass --tokenizer DIR to tokenize it (or send token ids)")
            item = tokenizer(item, add_special_tokens=False)["input_ids"]
        if not isinstance(item, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in item):
            raise InvalidInput(f"line {n}: token ids must be a JSON list of integers")
        out.append(item)
    if not out:
        raise InvalidInput("no sequences in the input")
    return out


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from ..errors import InvalidInput
    from .detect import WatermarkDetector

    try:
        tokenizer = None
        if args.tokenizer:
            from transformers import AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True)
            except (OSError, ValueError) as e:
                raise InvalidInput(f"cannot load a tokenizer from {args.tokenizer}: {e}") from None
        spec, ring, tenant = _detector(args)
        if tokenizer is not None and spec.vocab_size is None:
            spec = replace(spec, vocab_size=len(tokenizer))
        detector = WatermarkDetector.from_keyring(spec, ring, tenant=tenant)
        lines = sys.stdin.readlines() if args.input == "-" else Path(args.input).read_text(encoding="utf-8").splitlines()
        report = detector.detect_many(_sequences(lines, tokenizer), key_ids=args.key_id)
    except InvalidInput as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:
        print(f"error: cannot read {args.input}: {e.strerror}", file=sys.stderr)
        return EXIT_BAD_INPUT
    doc = {"results": [asdict(r) for r in report.results], "combined": asdict(report.combined),
           "keys_tried": list(report.keys_tried)}
    print(json.dumps(doc, sort_keys=True))
    return 0
