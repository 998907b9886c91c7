"""Small models for tests, demos and experiments: tokenizers, tiny causal LMs, MLP classifiers.

This subpackage imports torch and transformers; ``import defense`` alone never does.
``load_model`` is the one loading path for any local model folder.
"""

from .classifier import (
    ClassifierConfig,
    MLPClassifier,
    build_classifier,
    load_classifier,
    save_classifier,
    train_classifier,
)
from .corpus import read_text_files, synthetic_corpus
from .factory import ARCHS, TinyLMConfig, build_lm, load_model, save_model
from .tiny import build_tiny_lm_folder
from .tokenizer import EOS_TOKEN, PAD_TOKEN, train_tokenizer
from .train import LMTrainConfig, lm_loss, pack_tokens, train_lm, unigram_loss

__all__ = [
    "ARCHS",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "ClassifierConfig",
    "LMTrainConfig",
    "MLPClassifier",
    "TinyLMConfig",
    "build_classifier",
    "build_lm",
    "build_tiny_lm_folder",
    "lm_loss",
    "load_classifier",
    "load_model",
    "pack_tokens",
    "read_text_files",
    "save_classifier",
    "save_model",
    "synthetic_corpus",
    "train_classifier",
    "train_lm",
    "train_tokenizer",
    "unigram_loss",
]
