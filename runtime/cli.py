"""`pi0-runtime`: the robot-side command line.

pi0-runtime serve  --bundle B [--endpoint E] [--backend auto|acl|onnxruntime] [--config FILE]
pi0-runtime infer  --bundle B --obs OBS.npz [--noise N.npy | --seed S] --out ACTIONS.npy
pi0-runtime check  [--bundle B]     what this machine has (backends, CANN, SoC) and whether the bundle fits
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from runtime.bundle import Bundle, BundleError, load_bundle
from runtime.engine import Engine, EngineError
from runtime.npu import detect_soc

log = logging.getLogger("pi0-runtime")

DEFAULTS: dict[str, Any] = {
    "bundle": None,
    "endpoint": "tcp://127.0.0.1:5555",
    "backend": "auto",
    "threads": 0,
    "queue_size": 4,
    "hang_timeout_s": 30.0,
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
    data = tomllib.loads(Path(path).read_text())
    data = data.get("runtime", data)
    unknown = set(data) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"{path}: unknown settings {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    config.update(data)
    return config


def make_backend(bundle: Bundle, name: str, threads: int = 0) -> Any:
    """The backend asked for; `auto` takes ACL when pyACL is importable and the bundle has OM files."""
    has_om = all(g.om is not None for g in bundle.graphs.values())
    if name == "auto":
        name = "acl" if has_om and importlib.util.find_spec("acl") is not None else "onnxruntime"
    if name == "acl":
        if not has_om:
            raise BundleError("the acl backend needs OM files: this bundle was not compiled with atc")
        from runtime.backends.acl import AclBackend

        return AclBackend(bundle)
    if name == "onnxruntime":
        from runtime.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(bundle, threads=threads or None)
    raise ValueError(f"unknown backend {name!r}; choose auto, acl or onnxruntime")


def setup_logging() -> None:
    under_systemd = "INVOCATION_ID" in os.environ  # journald stamps the time itself
    fmt = "%(levelname)s %(message)s" if under_systemd else "%(asctime)s %(levelname)s %(message)s"
    logging.basicConfig(level=logging.INFO, format=fmt, stream=sys.stdout)


def cmd_serve(args: argparse.Namespace) -> int:
    from runtime.server import Server, ServerConfig

    config = load_config(args.config)
    for key in ("bundle", "endpoint", "backend", "threads"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    if config["bundle"] is None:
        raise ValueError("no bundle: give --bundle or set `bundle` in the config file")
    log.info("loading bundle %s ...", config["bundle"])
    bundle = load_bundle(config["bundle"])

    def engine_factory() -> Engine:
        return Engine(bundle, make_backend(bundle, config["backend"], config["threads"]))

    server_config = ServerConfig(
        endpoint=config["endpoint"], queue_size=config["queue_size"], hang_timeout_s=config["hang_timeout_s"]
    )
    server = Server(engine_factory, server_config)
    log.info(
        "bundle %s (%s, %s) on backend %s",
        bundle.root,
        bundle.manifest["source"],
        bundle.precision,
        server.engine.backend.name,
    )
    return server.serve()


def read_observation(path: Path) -> dict[str, Any]:
    """OBS.npz (LeRobot feature names; see --help) -> engine arguments."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    prompt = arrays.pop("prompt", None)
    return {
        "images": {k: v for k, v in arrays.items() if k.startswith("observation.images.")},
        "state": arrays["observation.state"].reshape(-1),
        "prompt": None if prompt is None else str(prompt),
        "tokens": arrays.get("lang_tokens"),
        "token_mask": arrays.get("lang_masks"),
    }


def cmd_infer(args: argparse.Namespace) -> int:
    bundle = load_bundle(args.bundle)
    engine = Engine(bundle, make_backend(bundle, args.backend))
    obs = read_observation(args.obs)
    noise = None if args.noise is None else np.load(args.noise, allow_pickle=False)
    trace: dict[str, np.ndarray] | None = {} if args.dump else None
    actions, timing = engine.infer(**obs, noise=noise, seed=args.seed, trace=trace)
    np.save(args.out, actions)
    if trace is not None:
        args.dump.mkdir(parents=True, exist_ok=True)
        for name, value in trace.items():
            np.save(args.dump / f"{name}.npy", np.asarray(value))
        log.info("%d stage tensors written to %s", len(trace), args.dump)
    log.info(
        "actions %s -> %s; %s", list(actions.shape), args.out, ", ".join(f"{k} {v:.1f}" for k, v in timing.items())
    )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from runtime import bench

    bundle = load_bundle(args.bundle)
    engine = Engine(bundle, make_backend(bundle, args.backend))
    print(f"engine ({engine.backend.name}, {bundle.precision}), {args.n} requests, ms:")
    print(bench.format_table(bench.bench_engine(engine, args.n)))
    if args.through_server:
        engine.close()
        print(f"through the server (PolicyClient over loopback TCP), {args.n} requests, ms:")
        print(bench.format_table(bench.bench_server(bundle, args.n, args.backend)))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    report: dict[str, Any] = {
        "onnxruntime": importlib.util.find_spec("onnxruntime") is not None,
        "pyacl": importlib.util.find_spec("acl") is not None,
        "acllite": importlib.util.find_spec("acllite_resource") is not None,
        "cann_version": None,
        "npu_smi_soc": None,
    }
    home = os.environ.get("ASCEND_HOME_PATH") or os.environ.get("ASCEND_TOOLKIT_HOME")
    if home:
        for name in ("version.cfg", "version.info"):
            file = Path(home) / name
            if file.is_file():
                report["cann_version"] = file.read_text().strip().splitlines()[0]
                break
    report["npu_smi_soc"] = detect_soc()
    if args.bundle:
        bundle = load_bundle(args.bundle)
        soc = bundle.manifest["atc"]["soc_version"]
        report["bundle"] = {
            "path": str(bundle.root),
            "verified": True,
            "om_compiled": bundle.manifest["atc"]["compiled"],
            "om_soc_version": soc,
            "om_matches_device": None if report["npu_smi_soc"] is None else soc == report["npu_smi_soc"],
        }
    print(json.dumps(report, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pi0-runtime", description="Serve a pi0 bundle to robot controllers over ZeroMQ."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve a bundle (systemd Type=notify friendly; logs to stdout)")
    serve.add_argument("--bundle", type=Path, help="bundle directory (or `bundle` in the config)")
    serve.add_argument(
        "--endpoint", help=f"ZeroMQ endpoint to bind (default {DEFAULTS['endpoint']}; ipc:///run/... works too)"
    )
    serve.add_argument(
        "--backend", choices=["auto", "acl", "onnxruntime"], help="default auto: acl when pyACL and OM files are there"
    )
    serve.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: one per core)")
    serve.add_argument(
        "--config", type=Path, help="TOML file with the settings above plus queue_size, hang_timeout_s; flags win"
    )
    serve.set_defaults(func=cmd_serve)

    infer = commands.add_parser(
        "infer",
        help="one inference from an .npz observation",
        description="OBS.npz keys: observation.images.<camera> (uint8 HxWx3 or 3xHxW, optional leading 1), "
        "observation.state, and prompt (a string) or lang_tokens + lang_masks.",
    )
    infer.add_argument("--bundle", type=Path, required=True)
    infer.add_argument("--obs", type=Path, required=True, metavar="OBS.npz")
    noise = infer.add_mutually_exclusive_group()
    noise.add_argument("--noise", type=Path, metavar="N.npy", help="initial noise [1, chunk, 32] (default: Gaussian)")
    noise.add_argument("--seed", type=int, help="seed of the Gaussian noise")
    infer.add_argument("--out", type=Path, required=True, metavar="ACTIONS.npy")
    infer.add_argument("--backend", choices=["auto", "acl", "onnxruntime"], default="auto")
    infer.add_argument(
        "--dump", type=Path, metavar="DIR", help="write every stage's tensors there as .npy (alignment work)"
    )
    infer.set_defaults(func=cmd_infer)

    bench = commands.add_parser(
        "bench", help="latency breakdown (p50/p90/p99) of the engine, optionally through the server"
    )
    bench.add_argument("--bundle", type=Path, required=True)
    bench.add_argument("--n", type=int, default=20, help="timed requests (default 20, after 2 warm-up ones)")
    bench.add_argument("--backend", choices=["auto", "acl", "onnxruntime"], default="auto")
    bench.add_argument(
        "--through-server", action="store_true", help="also time PolicyClient round trips to a `serve` on loopback"
    )
    bench.set_defaults(func=cmd_bench)

    check = commands.add_parser("check", help="report backends, CANN, the NPU's SoC and whether a bundle fits")
    check.add_argument("--bundle", type=Path)
    check.set_defaults(func=cmd_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (BundleError, EngineError, ValueError, FileNotFoundError) as e:
        log.error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
