"""The one place process settings are read from the environment.

Only process-level settings come from the environment (which files to read, the admin token);
policy always comes from the config file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

ENV_CONFIG = "DISTILLGUARD_CONFIG"
ENV_KEYS = "DISTILLGUARD_KEYS"
ENV_ADMIN_TOKEN = "DISTILLGUARD_ADMIN_TOKEN"


@dataclass(frozen=True, slots=True)
class EnvSettings:
    config_path: str | None = None
    keys_path: str | None = None
    admin_token: str | None = None

    def __repr__(self) -> str:  # the admin token is a secret
        token = "set" if self.admin_token else "unset"
        return f"EnvSettings(config_path={self.config_path!r}, keys_path={self.keys_path!r}, admin_token={token})"


def read_environment(environ: Mapping[str, str] | None = None) -> EnvSettings:
    env = os.environ if environ is None else environ
    return EnvSettings(
        config_path=env.get(ENV_CONFIG) or None,
        keys_path=env.get(ENV_KEYS) or None,
        admin_token=env.get(ENV_ADMIN_TOKEN) or None,
    )
