"""The daemon's settings: defaults, the TOML config file (`/etc/pi0-runtime/config.toml`), and the
`ServerConfig` built from them. The serving defaults are `ServerConfig`'s own, stated once there."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.daemon.auth import AuthConfigError, CurveConfig, check_exposure, is_network_endpoint
from runtime.daemon.limits import ACTION_SETTINGS, ActionLimits, LimitsConfigError
from runtime.daemon.state_guard import SETTINGS as STATE_SETTINGS
from runtime.daemon.state_guard import StateRangeSettings
from runtime.errors import ConfigError


@dataclass
class ServerConfig:
    endpoint: str = "tcp://127.0.0.1:5555"
    queue_size: int = 4
    hang_timeout_s: float = 30.0
    status_interval_s: float = 5.0
    warm_up: bool = True  # one synthetic inference before READY=1
    limits: ActionLimits = field(default_factory=ActionLimits)
    state_range: StateRangeSettings = field(default_factory=StateRangeSettings)  # the state guard: warn by default
    curve: CurveConfig | None = None  # for network endpoints: only allow-listed client keys are served
    max_frame_bytes: int | None = None  # None: derived from the bundle's cameras (runtime.daemon.intake)
    websocket: tuple[str, int] | None = None  # openpi's websocket endpoint (host, port), off when None
    api_keys: frozenset[str] = frozenset()  # for the websocket endpoint; required off loopback
    log_interval_s: float = 10.0  # refusals: the first of a kind in full, then one summary line per interval
    robot: str = ""  # the `robot` label of every metric (which robot this daemon serves)
    metrics: tuple[str, int] | None = None  # /metrics and the health endpoints (host, port), off when None
    metrics_api_keys: frozenset[str] = frozenset()  # bearer keys for /metrics; required off loopback
    bundle_name: str = ""  # the `bundle` label: the served bundle's directory name (the store's version)
    fell_back_from: str = ""  # the store's `current` that failed verification at start, when `previous` is served


_SERVER = ServerConfig()
DEFAULTS: dict[str, Any] = {
    "bundle": None,
    "endpoint": _SERVER.endpoint,
    "backend": "auto",
    "threads": 0,  # onnxruntime intra-op threads; 0: one per core
    "num_steps": None,  # flow-matching steps per chunk; None: the bundle's (the count it was validated with)
    # Serve OM files whose matmuls atc placed on the AI CPU (the ACL backend refuses them otherwise).
    "allow_ai_cpu": False,
    "queue_size": _SERVER.queue_size,
    "hang_timeout_s": _SERVER.hang_timeout_s,
    # Intake (runtime/daemon/intake.py): the largest frame a client may send (None: from the bundle's cameras,
    # each at max(2x its trained size, 1920x1080)); a larger one gets the connection dropped.
    "max_frame_bytes": _SERVER.max_frame_bytes,
    "log_interval_s": _SERVER.log_interval_s,  # refusals: first in full, then one summary per kind per interval
    # The [limits] table: joint_min, joint_max, max_step (one per action dimension), clamp (runtime/daemon/limits.py);
    # out_of_range ("warn", "refuse", "off"), state_max_z, state_quantile_margin, state_ignore: the state
    # guard against a state outside the training statistics (runtime/daemon/state_guard.py).
    "limits": {},
    # CURVE (see runtime/daemon/auth.py): the daemon's secret key file and a directory of allowed client keys.
    "curve_server_key": None,
    "curve_allowed_clients": None,
    "allow_insecure_network": False,
    # openpi's websocket protocol (runtime/daemon/websocket.py): "host:port", e.g. "127.0.0.1:8000"; off when unset.
    # Off loopback it needs API keys: a file of allowed keys, one per line (`Authorization: Api-Key ...`).
    "websocket_endpoint": None,
    "websocket_api_keys": None,
    # Prometheus metrics and health endpoints (runtime/daemon/metrics.py): "host:port", e.g. "127.0.0.1:9464"
    # (the packaged config's); off when unset. Off loopback it needs keys: a file of bearer keys, one per line.
    "metrics_endpoint": None,
    "metrics_api_keys": None,
    "robot": _SERVER.robot,  # the metrics' `robot` label
}


def load_config(path: Path | None) -> dict[str, Any]:
    """DEFAULTS, overridden by the TOML file's keys (top level or a [runtime] table)."""
    config = dict(DEFAULTS)
    if path is None:
        return config
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        data = tomllib.loads(Path(path).read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from e
    limits = data.pop("limits", None)
    data = data.get("runtime", data)
    if limits is not None:
        data = {**data, "limits": limits}
    unknown = set(data) - set(DEFAULTS)
    if unknown:
        raise ConfigError(f"{path}: unknown settings {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    config.update(data)
    return config


def http_settings(config: dict[str, Any], what: str) -> tuple[tuple[str, int] | None, frozenset[str]]:
    """An HTTP endpoint's (host, port) and its keys from `{what}_endpoint` and `{what}_api_keys` (the
    websocket's, the metrics'); refuses one reachable from the network without keys (unless
    allow_insecure_network)."""
    endpoint, keys_file = config[f"{what}_endpoint"], config[f"{what}_api_keys"]
    if endpoint is None:
        return None, frozenset()
    host, _, port = str(endpoint).rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"{what}_endpoint {endpoint!r}: expected HOST:PORT, e.g. 127.0.0.1:8000")
    keys = frozenset()
    if keys_file is not None:
        lines = Path(keys_file).read_text().splitlines()
        keys = frozenset(k.strip() for k in lines if k.strip() and not k.startswith("#"))
        if not keys:
            raise AuthConfigError(f"{keys_file} lists no API keys")
    if not keys and is_network_endpoint(f"tcp://{host}:{port}") and not config["allow_insecure_network"]:
        raise AuthConfigError(
            f"{what} endpoint {endpoint} is reachable from the network and no API keys are configured: set "
            f"{what}_api_keys (a file of keys, one per line), bind loopback, or set allow_insecure_network = true"
        )
    return (host.strip("[]"), int(port)), keys


def limits_settings(table: Any, action_dim: int) -> tuple[ActionLimits, StateRangeSettings]:
    """The [limits] table -> the action limits and the state guard's settings."""
    if not isinstance(table, dict):
        raise LimitsConfigError("[limits] must be a table")
    unknown = set(table) - set(ACTION_SETTINGS) - set(STATE_SETTINGS)
    if unknown:
        raise LimitsConfigError(
            f"unknown [limits] settings {sorted(unknown)}; known: {sorted({*ACTION_SETTINGS, *STATE_SETTINGS})}"
        )
    state = {k: v for k, v in table.items() if k in STATE_SETTINGS}
    actions = {k: v for k, v in table.items() if k not in STATE_SETTINGS}
    return ActionLimits.from_config(actions, action_dim), StateRangeSettings.from_config(state)


def server_config(config: dict[str, Any], action_dim: int) -> ServerConfig:
    """The settings as the server takes them; refuses a network endpoint without CURVE (unless allowed)."""
    curve = None
    if config["curve_server_key"] or config["curve_allowed_clients"]:
        if not (config["curve_server_key"] and config["curve_allowed_clients"]):
            raise AuthConfigError("CURVE needs both curve_server_key and curve_allowed_clients")
        curve = CurveConfig.from_files(Path(config["curve_server_key"]), Path(config["curve_allowed_clients"]))
    check_exposure(config["endpoint"], curve, config["allow_insecure_network"])
    websocket, api_keys = http_settings(config, "websocket")
    metrics, metrics_api_keys = http_settings(config, "metrics")
    limits, state_range = limits_settings(config["limits"], action_dim)
    return ServerConfig(
        endpoint=config["endpoint"],
        queue_size=config["queue_size"],
        hang_timeout_s=config["hang_timeout_s"],
        max_frame_bytes=config["max_frame_bytes"],
        log_interval_s=config["log_interval_s"],
        limits=limits,
        state_range=state_range,
        curve=curve,
        websocket=websocket,
        api_keys=api_keys,
        robot=str(config["robot"]),
        metrics=metrics,
        metrics_api_keys=metrics_api_keys,
        bundle_name=Path(config["bundle"]).resolve().name if config["bundle"] else "",
    )
