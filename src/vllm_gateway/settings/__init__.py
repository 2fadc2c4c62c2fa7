"""The gateway's configuration: one frozen object, built once from the environment and the CLI.

- ``declaration.py``: every setting, declared once as a field of ``Settings`` (the pool's in its
  ``PoolSettings`` group, ``settings.pool``) that carries its --help group, default, environment
  variable, flag, parser and help.
- ``parsers.py``: the values' parsers and ``SettingsError``.
- ``loading.py``: ``load_settings`` applies defaults, then the environment, then the flags, and
  validates the result; ``add_arguments`` gives ``serve`` its grouped flags; ``env_names``.

Nothing else in the package reads ``os.environ``: the settings object is passed explicitly to
whatever needs it. An invalid value raises ``SettingsError`` naming the variable; only the CLI turns
that into an exit status.
"""

from vllm_gateway.settings.declaration import FIELDS, ROUTINGS, PoolSettings, Settings
from vllm_gateway.settings.loading import add_arguments, env_names, load_settings
from vllm_gateway.settings.parsers import SettingsError

__all__ = [
    "FIELDS",
    "ROUTINGS",
    "PoolSettings",
    "Settings",
    "SettingsError",
    "add_arguments",
    "env_names",
    "load_settings",
]
