"""Adapters that attach distillguard to fronts and engines; each imports only when its engine is installed."""
