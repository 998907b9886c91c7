"""Attack-versus-defense experiments: one command per study, on the real defense path.

``distillguard experiment run experiments/configs/smoke.yaml`` runs a study; see experiments/README.md.
This package imports ``defense``; ``defense`` never imports it.
"""
