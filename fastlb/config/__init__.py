"""The fastlb config: a frozen ``Config`` read from TOML, checked, written back, changed live.

- ``model``: the dataclasses (Settings, Vip, Backend, HealthCheck, Bgp), the
  names of things (``Vip.name``, ``Backend.key``, ``parse_vip_spec``) and the
  schema's keys and limits;
- ``load``: ``load_config(path)`` and ``parse_config(text)`` read TOML,
  ``validate(config)`` checks a Config built in code by the same rules;
- ``render``: ``render_config(config)``, the TOML that reads back equal;
- ``edits``: live changes as pure functions Config -> Config;
- ``table`` and ``lines``: typed access to one TOML table, and the scanner
  that finds a key's line (``tomllib`` gives no positions).

Every problem is one ``ConfigError`` that names the key as a dotted path with
0-based indices in file order (``vip[1].backend[0].address``) and its 1-based
line. docs/CONFIG.md lists every key. Callers import from here.
"""

from fastlb.config.lines import KeyLines as _KeyLines
from fastlb.config.load import _is_prime, _nearest_primes, load_config, parse_config, validate, warnings
from fastlb.config.model import (_SETTINGS_KEYS, _SETTINGS_RANGES, ALGORITHMS, ALL_DOWN, ANNOUNCE,
                                 CLIENT_IP, FORWARDING, HASHES, HEALTH_KINDS,
                                 L7_PROTOCOLS, MAX_PAYLOAD, PROTOCOLS, SPEAKERS, Backend, Bgp, BgpPeer, Config,
                                 HealthCheck, IPAddress, KeyPath, Route, Settings, Vip, hostport, l4_view,
                                 parse_vip_spec, vip_name)
from fastlb.config.render import config_data, render_config
from fastlb.errors import ConfigError

__all__ = [
    "ALGORITHMS", "ALL_DOWN", "ANNOUNCE", "CLIENT_IP",
    "FORWARDING", "HASHES", "HEALTH_KINDS", "L7_PROTOCOLS", "MAX_PAYLOAD", "PROTOCOLS", "SPEAKERS", "Backend", "Bgp",
    "BgpPeer", "Config", "ConfigError", "HealthCheck", "IPAddress", "KeyPath", "Route", "Settings", "Vip",
    "config_data", "hostport", "l4_view", "load_config", "parse_config", "parse_vip_spec", "render_config",
    "validate", "vip_name", "warnings",
    "_KeyLines", "_SETTINGS_KEYS", "_SETTINGS_RANGES", "_is_prime", "_nearest_primes",
]
