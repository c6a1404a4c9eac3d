"""Configuration: frozen dataclasses and a pure TOML loader.

``load_config(text)`` builds a :class:`Config`; every error is a :class:`ConfigError` that
names the key and, where known, the line. One module per concern:

    schema.py   the dataclasses, policies and shared limits
    keys.py     every key's value kind and documentation (drives parsing and explain)
    locate.py   line numbers of keys in the TOML text, syntax errors placed on their line
    loader.py   text -> Config; read_config_text, the one function that reads a file
    checks.py   cross-key errors and warnings
    explain.py  check-config --explain and docs/CONFIG.md
"""

from __future__ import annotations

from vpnmasq.config.checks import (
    UPSTREAM_NAT_NETWORKS,
    upstream_nat_reason,
    upstream_nat_warning,
)
from vpnmasq.config.explain import (
    explain,
)
from vpnmasq.config.keys import (
    AUTO,
    ESP_DOCS,
    ESP_KEYS,
    FORWARD_KEYS,
    LIMIT_DOCS,
    LIMIT_KEYS,
    ROUTE_KEYS,
    SYNC_KEYS,
    TIMEOUT_DOCS,
    TIMEOUT_KEYS,
    TOP_KEYS,
    KeySpec,
    interface_name_problem,
)
from vpnmasq.config.loader import (
    load_config,
    load_config_file,
    parse_value,
    read_config_text,
    validate,
)
from vpnmasq.config.locate import (
    Locator,
)
from vpnmasq.config.schema import (
    DEFAULT_LOCAL_PORT_RANGE,
    DEFAULT_NEW_PER_HOST_PER_SECOND,
    FORWARD_PROTOCOLS,
    HOST_ENTRY_SHARE,
    HOST_PORT_SHARE,
    HYBRID_PORT_RANGE,
    IFNAME_RULE_CHARS,
    IFNAMSIZ,
    KNOWN_HELPERS,
    LOG_LEVELS,
    MAX_MSS,
    MAX_UNIX_PATH,
    MIN_MSS,
    RFC_MINIMUM_TIMEOUTS,
    TYPICAL_IPSEC_REKEY,
    AddressChangePolicy,
    AmbiguousIkePolicy,
    Config,
    ConfigError,
    ConfigErrors,
    EspPolicy,
    Filtering,
    Forward,
    Limits,
    LocalVpnPolicy,
    Mode,
    PortRange,
    Route,
    Sync,
    Timeouts,
)

__all__ = [
    "AUTO",
    "AddressChangePolicy",
    "AmbiguousIkePolicy",
    "Config",
    "ConfigError",
    "ConfigErrors",
    "DEFAULT_LOCAL_PORT_RANGE",
    "DEFAULT_NEW_PER_HOST_PER_SECOND",
    "ESP_DOCS",
    "ESP_KEYS",
    "EspPolicy",
    "FORWARD_KEYS",
    "FORWARD_PROTOCOLS",
    "Filtering",
    "Forward",
    "HOST_ENTRY_SHARE",
    "HOST_PORT_SHARE",
    "HYBRID_PORT_RANGE",
    "IFNAME_RULE_CHARS",
    "IFNAMSIZ",
    "KNOWN_HELPERS",
    "KeySpec",
    "LIMIT_DOCS",
    "LIMIT_KEYS",
    "LOG_LEVELS",
    "Limits",
    "LocalVpnPolicy",
    "MAX_MSS",
    "MAX_UNIX_PATH",
    "MIN_MSS",
    "Mode",
    "PortRange",
    "RFC_MINIMUM_TIMEOUTS",
    "ROUTE_KEYS",
    "Route",
    "SYNC_KEYS",
    "Sync",
    "TIMEOUT_DOCS",
    "TIMEOUT_KEYS",
    "TOP_KEYS",
    "TYPICAL_IPSEC_REKEY",
    "Timeouts",
    "UPSTREAM_NAT_NETWORKS",
    "Locator",
    "explain",
    "interface_name_problem",
    "load_config",
    "load_config_file",
    "parse_value",
    "read_config_text",
    "upstream_nat_reason",
    "upstream_nat_warning",
    "validate",
]
