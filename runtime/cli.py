"""`pi0-runtime`: the robot-side command line.

pi0-runtime serve  --bundle B [--endpoint E] [--backend auto|acl|onnxruntime] [--config FILE]
pi0-runtime infer  --bundle B --obs OBS.npz [--noise N.npy | --seed S] --out ACTIONS.npy
pi0-runtime check  [--bundle B]     what this machine has (backends, CANN, SoC) and whether the bundle fits
pi0-runtime check  --store [S]      the same for the bundle `serve` serves of the store (`previous` if `current` fails)
pi0-runtime install-bundle B        verify B, add it to the bundle store, switch `current`, restart the service
                   [--reuse]        ... or, when B is the store's `current` already, nothing; its `previous`, rollback
pi0-runtime rollback                serve the previous bundle again
pi0-runtime bundles                 what the store holds
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from runtime.backends import BACKENDS, BackendOptions, capabilities, make_backend, resolve_backend
from runtime.bundle.manifest import OM, BundleError, load_bundle
from runtime.daemon.auth import generate_keys
from runtime.daemon.config import DEFAULTS, load_config, server_config
from runtime.daemon.intake import cgroup_memory_max, check_memory_for
from runtime.daemon.store import CURRENT, DEFAULT_STORE, BundleStore, StoreError, load_served_bundle
from runtime.daemon.systemd import SERVICE, restart_service, setup_logging
from runtime.engine import Engine
from runtime.errors import ConfigError, describe, run_command
from runtime.npu import (
    MIN_CANN,
    cann_environment,
    cann_version,
    check_om_soc,
    detect_soc,
    device_soc,
    environment_file,
    find_set_env,
    om_soc_check,
)
from runtime.pipeline.observation import Observation, guidance_scale

log = logging.getLogger("pi0-runtime")


def cmd_serve(args: argparse.Namespace) -> int:
    from runtime.daemon.server import Server

    config = load_config(args.config)
    for key in ("bundle", "endpoint", "backend", "threads", "websocket_endpoint", "num_steps", "allow_ai_cpu"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    if config["bundle"] is None:
        raise ConfigError("no bundle: give --bundle or set `bundle` in the config file")
    log.info("loading bundle %s ...", config["bundle"])
    # The store's `current` that does not verify: `previous` is served, said in one warning line (store.py).
    bundle, served = load_served_bundle(config["bundle"])
    config["bundle"] = served.path  # what is served, from here on (the link's target, or `previous`'s)
    settings = replace(server_config(config, bundle.spec.action_dim), fell_back_from=served.fell_back_from or "")
    graphs = bundle.manifest.graphs.values()
    weights = sum((bundle.root / f).stat().st_size for g in graphs for f in (g.onnx, g.onnx_data) if f)
    backend = resolve_backend(bundle, config["backend"])
    if capabilities(backend).artefact == OM:
        soc = check_om_soc(bundle)  # an OM for another SoC: refused before anything is loaded
        log.info("OM files for %s; this device: %s", soc.om, soc.device or "unknown (no pyACL SoC, no npu-smi)")
    check_memory_for(weights, backend, capabilities(backend), cgroup_memory_max())
    # allow_ai_cpu: the ACL backend serves an fp32 bundle (every matmul on the AI CPU) only when told to.
    options = BackendOptions(threads=config["threads"], allow_ai_cpu=bool(config["allow_ai_cpu"]))

    def engine_factory() -> Engine:
        engine = Engine.from_bundle(bundle, make_backend(bundle, backend, options))
        return engine.with_num_steps(config["num_steps"])

    server = Server(engine_factory, settings)
    metadata = server.engine.metadata()
    log.info("bundle %s (%s, %s) on backend %s", bundle.root, metadata.source, metadata.precision, metadata.backend)
    return server.serve()


def cmd_infer(args: argparse.Namespace) -> int:
    scale = None if args.guidance_scale is None else guidance_scale(args.guidance_scale)  # refused before loading
    bundle = load_bundle(args.bundle)
    engine = Engine.from_bundle(bundle, make_backend(bundle, args.backend))
    obs = Observation.from_npz(args.obs)
    if args.noise is not None:
        obs = replace(obs, noise=np.load(args.noise, allow_pickle=False))
    if args.seed is not None:
        obs = replace(obs, seed=args.seed)
    if scale is not None:
        obs = replace(obs, guidance_scale=scale)
    trace: dict[str, np.ndarray] | None = {} if args.dump else None
    actions, timing = engine.infer(obs, trace=trace)
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
    from runtime.daemon import bench

    bundle = load_bundle(args.bundle)
    engine = Engine.from_bundle(bundle, make_backend(bundle, args.backend))
    print(f"engine ({engine.backend.name}, {bundle.precision}), {args.n} requests, ms:")
    print(bench.format_table(bench.bench_engine(engine, args.n)))
    if args.through_server:
        engine.close()
        print(f"through the server (PolicyClient over loopback TCP), {args.n} requests, ms:")
        print(bench.format_table(bench.bench_server(bundle, args.n, args.backend)))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Exit 1 when this machine cannot serve: CANN older than MIN_CANN, or the bundle's OM files compiled
    for another SoC than this device's."""
    cann = cann_version()
    soc, soc_source = device_soc()
    report: dict[str, Any] = {
        "onnxruntime": importlib.util.find_spec("onnxruntime") is not None,
        "pyacl": importlib.util.find_spec("acl") is not None,
        "acllite": importlib.util.find_spec("acllite_resource") is not None,
        "cann_version": cann.version,
        "cann_version_file": None if cann.file is None else str(cann.file),
        "cann_minimum": MIN_CANN,
        "cann_supported": cann.supported,
        "npu_smi_soc": detect_soc(),
        "device_soc": soc,
        "device_soc_source": soc_source,
    }
    problems = []
    if cann.supported is False:
        problems.append(f"CANN {cann.version} ({cann.file}) is older than the {MIN_CANN} this runtime needs")
    elif cann.version is not None and cann.supported is None:
        log.warning("CANN version %r (%s) is not one I can compare with %s", cann.version, cann.file, MIN_CANN)
    if args.store is not None:
        args.bundle = args.store / CURRENT
    if args.bundle:
        # What `serve` would serve for this path: for a store's `current` that does not verify, `previous`.
        bundle, served = load_served_bundle(args.bundle)
        report["served"] = served.to_dict()
        om = bundle.manifest.compiled.get(OM)
        check = om_soc_check(bundle)
        if check.matches is False:
            problems.append(check.describe())
        report["bundle"] = {
            "path": str(bundle.root),
            "verified": True,
            "om_compiled": bundle.artefact(OM) is not None,
            "om_soc_version": None if om is None else om.device or None,
            "om_matches_device": check.matches,
            "source": bundle.manifest.source,
            "model_type": "pi05" if bundle.manifest.model.get("pi05") else "pi0",
            "conventions": bundle.spec.conventions,
            "guidance": None if bundle.manifest.guidance is None else bundle.manifest.guidance.to_dict(),
            "cameras": {
                key: "optional" if key in bundle.spec.optional_cameras else "required"
                for key in bundle.spec.camera_keys
            },
        }
    print(json.dumps(report, indent=2))
    for problem in problems:
        log.error("%s", problem)
    return 1 if problems else 0


def cmd_install_bundle(args: argparse.Namespace) -> int:
    store = BundleStore(args.store)
    before = store.current, store.previous
    log.info("verifying %s ...", args.bundle)
    held = store.holding(args.bundle) if args.reuse else None
    if held is not None:
        check_om_soc(load_bundle(args.bundle))  # what install verifies first, whichever way it goes on
        try:
            if held == CURRENT:
                store.verified(CURRENT)  # the store's copy too: a damaged one is replaced by a new copy
                log.info("%s is the store's `current` bundle %s already: nothing to do", args.bundle, before[0])
                return 0
            log.info("%s is the store's `previous` bundle %s: rolling back to it", args.bundle, before[1])
            return cmd_rollback(args)  # served again, with no second copy
        except (BundleError, StoreError, OSError) as e:
            log.warning("the store's %s copy: %s; copying %s into the store again", held, describe(e), args.bundle)
    name = store.install(args.bundle)
    log.info("installed %s as %s; `current` -> %s, `previous` -> %s", args.bundle, name, name, store.previous)
    if args.no_restart or restart_service(args.service):
        return 0
    store.undo_install(name, *before)
    if before[0] is None:
        log.error("the service does not start on %s, and there was no bundle before it; it was removed", name)
        return 1
    log.error("the service does not start on %s: it was removed and %s is current again", name, before[0])
    restart_service(args.service)
    return 1


def cmd_rollback(args: argparse.Namespace) -> int:
    store = BundleStore(args.store)
    name = store.rollback()
    log.info("`current` -> %s, `previous` -> %s", name, store.previous)
    return 0 if args.no_restart or restart_service(args.service) else 1


def cmd_bundles(args: argparse.Namespace) -> int:
    for bundle in BundleStore(args.store).installed():
        mark = "current " if bundle.current else "previous" if bundle.previous else "        "
        print(f"{mark}  {bundle.name}  {bundle.precision:5s}  {bundle.source}")
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    public, secret = generate_keys(args.dir, args.name, args.group)
    mode = oct(secret.stat().st_mode & 0o777)[2:]
    print(f"public key {public} (give it to the other side), secret key {secret} (keep it here, mode {mode})")
    return 0


def cmd_cann_env(args: argparse.Namespace) -> int:
    set_env = args.set_env or find_set_env()
    if set_env is None:
        log.warning("no CANN set_env.sh found; the service will run on the CPU backend until CANN is installed")
        return 1
    text = environment_file(cann_environment(set_env), set_env)
    if args.out is None:
        sys.stdout.write(text)
        return 0
    temporary = args.out.with_name(f".{args.out.name}.tmp")
    temporary.write_text(text)
    temporary.chmod(0o644)
    os.replace(temporary, args.out)
    log.info("wrote %s from %s", args.out, set_env)
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
    serve.add_argument("--backend", choices=BACKENDS, help="default auto: acl when pyACL and OM files are there")
    serve.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: one per core)")
    serve.add_argument(
        "--num-steps",
        type=int,
        metavar="N",
        help="flow-matching (Euler) steps per chunk instead of the bundle's (fewer: faster, coarser actions)",
    )
    serve.add_argument(
        "--websocket",
        dest="websocket_endpoint",
        metavar="HOST:PORT",
        help="also serve openpi's websocket protocol there, for openpi-client robot code (e.g. 127.0.0.1:8000)",
    )
    serve.add_argument(
        "--allow-ai-cpu",
        action="store_const",
        const=True,
        default=None,
        help="serve an fp32 bundle on the acl backend: the 310P's Cube has no float32, so every matmul runs on its "
        "AI CPU (slow; refused by default)",
    )
    serve.add_argument(
        "--config", type=Path, help="TOML file with the settings above plus queue_size, hang_timeout_s; flags win"
    )
    serve.set_defaults(func=cmd_serve)

    infer = commands.add_parser(
        "infer",
        help="one inference from an .npz observation",
        description="OBS.npz keys, as a request names them: one array per camera under the bundle's camera keys "
        "(`pi0-runtime check --bundle B` or the metadata list them: observation.images.<camera> for LeRobot, "
        "cam_high/cam_left_wrist/cam_right_wrist for openpi's ALOHA; uint8 HxWx3 or 3xHxW, optional leading 1), "
        "observation.state (the raw robot state), and prompt (a string) or lang_tokens + lang_masks.",
    )
    infer.add_argument("--bundle", type=Path, required=True)
    infer.add_argument("--obs", type=Path, required=True, metavar="OBS.npz")
    noise = infer.add_mutually_exclusive_group()
    noise.add_argument("--noise", type=Path, metavar="N.npy", help="initial noise [1, chunk, 32] (default: Gaussian)")
    noise.add_argument("--seed", type=int, help="seed of the Gaussian noise")
    infer.add_argument("--out", type=Path, required=True, metavar="ACTIONS.npy")
    infer.add_argument(
        "--guidance-scale",
        type=float,
        metavar="BETA",
        help="classifier-free guidance's beta, for a bundle exported with guidance (default: the bundle's; "
        "1 = the conditioned branch alone; docs/guidance.md)",
    )
    infer.add_argument("--backend", choices=BACKENDS, default="auto")
    infer.add_argument(
        "--dump", type=Path, metavar="DIR", help="write every stage's tensors there as .npy (alignment work)"
    )
    infer.set_defaults(func=cmd_infer)

    bench = commands.add_parser(
        "bench", help="latency breakdown (p50/p90/p99) of the engine, optionally through the server"
    )
    bench.add_argument("--bundle", type=Path, required=True)
    bench.add_argument("--n", type=int, default=20, help="timed requests (default 20, after 2 warm-up ones)")
    bench.add_argument("--backend", choices=BACKENDS, default="auto")
    bench.add_argument(
        "--through-server", action="store_true", help="also time PolicyClient round trips to a `serve` on loopback"
    )
    bench.set_defaults(func=cmd_bench)

    check = commands.add_parser(
        "check",
        help="report backends, CANN, the NPU's SoC and whether a bundle fits",
        description="With --store (or --bundle STORE/current), the bundle `serve` would serve: `current`, or "
        "`previous` when `current` does not verify (JSON `served`: name, path, fell_back_from, reason).",
    )
    target = check.add_mutually_exclusive_group()
    target.add_argument("--bundle", type=Path)
    target.add_argument(
        "--store",
        type=Path,
        nargs="?",
        const=DEFAULT_STORE,
        help=f"check the bundle `serve` would serve of this store (default {DEFAULT_STORE})",
    )
    check.set_defaults(func=cmd_check)

    def store_arguments(command: argparse.ArgumentParser, restarts: bool = True) -> None:
        command.add_argument(
            "--store", type=Path, default=DEFAULT_STORE, help=f"the bundle store (default {DEFAULT_STORE})"
        )
        if restarts:
            command.add_argument("--service", default=SERVICE, help=f"the unit to restart (default {SERVICE})")
            command.add_argument("--no-restart", action="store_true", help="switch the links only")

    install = commands.add_parser(
        "install-bundle",
        help="verify a bundle, copy it into the store, switch `current` to it atomically, restart the service",
        description="Nothing changes unless the bundle and its copy verify. If the service does not come up on "
        "the new bundle, it is taken out again and the links are as before. The previous bundle stays for `rollback`.",
    )
    install.add_argument("bundle", type=Path, help="an exported bundle directory")
    install.add_argument(
        "--reuse",
        action="store_true",
        help="when the bundle (verified) is the store's `current` already, change nothing; when it is `previous`, "
        "roll back to it instead of copying it again (the bundle packages' postinst: a downgrade)",
    )
    store_arguments(install)
    install.set_defaults(func=cmd_install_bundle)

    rollback = commands.add_parser("rollback", help="serve the previous bundle again (swaps `current` and `previous`)")
    store_arguments(rollback)
    rollback.set_defaults(func=cmd_rollback)

    cann = commands.add_parser(
        "cann-env",
        help="write CANN's environment (what its set_env.sh exports) as the service's EnvironmentFile",
        description='Sources set_env.sh once, from a clean environment, and writes what it adds as KEY="value" '
        "lines. The package runs it at install (to /etc/pi0-runtime/cann.env); rerun it after a CANN upgrade.",
    )
    cann.add_argument("--set-env", type=Path, help="CANN's set_env.sh (default: the first of the usual places)")
    cann.add_argument("--out", type=Path, help="the file to write (default: print)")
    cann.set_defaults(func=cmd_cann_env)

    keygen = commands.add_parser(
        "keygen",
        help="make a CURVE key pair (NAME.key public, NAME.key_secret secret) for the daemon or a controller",
        description="The daemon's pair goes in curve_server_key (the .key_secret file); each controller's "
        "public NAME.key goes into the curve_allowed_clients directory; controllers get the daemon's public "
        "key. Existing files are never overwritten.",
    )
    keygen.add_argument("name", help="file name stem, e.g. the host's name")
    keygen.add_argument("--dir", type=Path, default=Path("."), help="where to write the files (default: here)")
    keygen.add_argument(
        "--group",
        help="let this group read the secret key (mode 0640), e.g. pi0-runtime for the daemon's own pair",
    )
    keygen.set_defaults(func=cmd_keygen)

    bundles = commands.add_parser("bundles", help="list the store: current, previous and older bundles")
    store_arguments(bundles, restarts=False)
    bundles.set_defaults(func=cmd_bundles)
    return parser


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    return run_command(lambda: args.func(args), log.error)


if __name__ == "__main__":
    sys.exit(main())
