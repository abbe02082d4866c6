"""`make wheel`, `make deb` and the device root filesystem: the wheels import without torch, the .deb
passes dpkg-deb and lintian, and, installed by dpkg into a Debian made by debootstrap, the daemon runs
from its installed path on the pi0-dummy bundle and answers the client.

Needs root, debootstrap and lintian (the Makefile's set-up installs them) and Debian's mirror."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import zmq
import zmq.auth as zmq_auth
from conftest import altered_copy, free_port, observation_for

from pi0_client.client import PolicyClient, ServerUnavailableError
from runtime.bundle.manifest import load_bundle

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[1]
PACKAGING = ROOT / "packaging"
CHROOT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive"}


def packaging_module(name: str):
    sys.path.insert(0, str(PACKAGING))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(PACKAGING))


def script(name: str, *args: object) -> subprocess.CompletedProcess:
    """packaging/NAME.py with `args`, its output captured."""
    command = [sys.executable, PACKAGING / f"{name}.py", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True)


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, str(PACKAGING / "deb.py"), "--arch", "amd64", "--out", str(out)], check=True)
    subprocess.run([sys.executable, str(PACKAGING / "wheels.py"), "--out", str(out)], check=True)
    return out


def wheel(dist: Path, name: str) -> Path:
    (path,) = dist.glob(f"{name}-*.whl")
    return path


@pytest.mark.parametrize(
    ("name", "imports"),
    [
        ("pi0_client", "pi0_client"),
        (
            "pi0_runtime",
            "runtime.cli, runtime.daemon.server, runtime.engine, runtime.daemon.store, runtime.backends.onnxruntime",
        ),
    ],
)
def test_wheels_work_without_torch(dist: Path, tmp_path: Path, name: str, imports: str) -> None:
    needed = [name] if name == "pi0_client" else [name, "pi0_client"]  # the runtime speaks the client's protocol
    for each in needed:
        with zipfile.ZipFile(wheel(dist, each)) as archive:
            archive.extractall(tmp_path / "unpacked")
            if each == name:
                metadata = next(archive.read(n).decode() for n in archive.namelist() if n.endswith("METADATA"))
                modules = sorted(n for n in archive.namelist() if n.endswith(".py"))
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist")]
    workstation_only = ("torch", "tensorstore", "orbax", "jax", "onnx>", "onnx=")  # the exporter's, never the robot's
    assert requires and not any(w in line for line in requires for w in workstation_only), requires
    if name == "pi0_client":
        names = ("__init__", "broker", "client", "metadata", "protocol", "wire")
        assert modules == [f"pi0_client/{module}.py" for module in names]
        assert sorted(r.split()[1] for r in requires) == ["numpy>=1.24", "pyzmq>=25"]
    else:
        assert not any(m.startswith("pi0_client/") for m in modules)
        assert any(r.startswith("Requires-Dist: pi0-client==") for r in requires)
        # openpi's websocket protocol adds websockets, and nothing that unpickles: no msgpack library either
        # (openpi's ndarray encoding is decoded by pi0_client.wire).
        assert any(r.split()[1].startswith("websockets") for r in requires)
        assert not any(w in line for line in requires for w in ("msgpack", "pickle", "dill"))
    # Import from the unpacked wheels alone (not this checkout) with torch made unimportable.
    module = imports.split(".")[0]
    blocked = "; ".join(f"sys.modules['{m}'] = None" for m in ("torch", "tensorstore", "jax", "orbax"))
    script = f"import sys; {blocked}; import {imports}; import {module}; print({module}.__file__)"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "unpacked")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(str(tmp_path / "unpacked"))


def test_deb_passes_dpkg_deb_and_lintian(dist: Path) -> None:
    (deb,) = dist.glob("pi0-runtime_*_amd64.deb")
    info = subprocess.run(["dpkg-deb", "--info", str(deb)], capture_output=True, text=True, check=True).stdout
    for field in ("Package: pi0-runtime", "Architecture: amd64", "Depends: python3 (>= 3.11), python3 (<< 3.12)"):
        assert field in info
    contents = subprocess.run(["dpkg-deb", "--contents", str(deb)], capture_output=True, text=True, check=True).stdout
    for path in (
        "./lib/systemd/system/pi0-runtime.service",
        "./etc/pi0-runtime/runtime.toml",
        "./usr/lib/sysusers.d/pi0-runtime.conf",
        "./usr/lib/tmpfiles.d/pi0-runtime.conf",
        "./usr/bin/pi0-runtime",
        "./opt/pi0-runtime/wheels/pi0_runtime-",
        "./opt/pi0-runtime/wheels/onnxruntime-",
    ):
        assert path in contents
    assert "torch" not in contents
    conffiles = subprocess.run(["dpkg-deb", "-I", str(deb), "conffiles"], capture_output=True, text=True, check=True)
    assert conffiles.stdout.split() == ["/etc/pi0-runtime/runtime.toml"]
    triggers = subprocess.run(["dpkg-deb", "-I", str(deb), "triggers"], capture_output=True, text=True, check=True)
    assert "interest-noawait pi0-runtime-restart" in triggers.stdout  # one restart per dpkg run
    lint = subprocess.run(["lintian", "--fail-on", "error,warning", str(deb)], capture_output=True, text=True, cwd=dist)
    assert lint.returncode == 0 and not [line for line in lint.stdout.splitlines() if line[:2] in ("E:", "W:")], (
        lint.stdout + lint.stderr
    )


def test_bundle_deb_passes_lintian_and_refuses_a_corrupt_bundle(dummy_bundle: Path, tmp_path: Path) -> None:
    """A bundle as a package: pi0-bundle-NAME, Architecture all, the bundle's files under
    /usr/share/pi0-bundles/NAME, maintainer scripts that go through the store; lintian-clean. A bundle
    whose files do not match its manifest is not packaged."""

    def bundle_deb(bundle: Path, version: str) -> subprocess.CompletedProcess:
        return script(
            "bundle_deb", "--bundle", bundle, "--name", "demo", "--version", version, "--out", tmp_path / "out"
        )

    built = bundle_deb(dummy_bundle, "1.2")
    assert built.returncode == 0, built.stderr
    deb = tmp_path / "out" / "pi0-bundle-demo_1.2_all.deb"
    assert built.stdout.strip().endswith(str(deb))
    info = subprocess.run(["dpkg-deb", "--info", str(deb)], capture_output=True, text=True, check=True).stdout
    for field in ("Package: pi0-bundle-demo", "Version: 1.2", "Architecture: all", "Depends: pi0-runtime"):
        assert field in info
    contents = subprocess.run(["dpkg-deb", "--contents", str(deb)], capture_output=True, text=True, check=True).stdout
    for name in load_bundle(dummy_bundle).manifest.files:
        assert f"./usr/share/pi0-bundles/demo/{name}" in contents
    postinst = subprocess.run(["dpkg-deb", "-I", str(deb), "postinst"], capture_output=True, text=True).stdout
    prerm = subprocess.run(["dpkg-deb", "-I", str(deb), "prerm"], capture_output=True, text=True).stdout
    assert (
        'pi0-runtime install-bundle --reuse "$BUNDLE"' in postinst and "BUNDLE=/usr/share/pi0-bundles/demo" in postinst
    )
    assert "pi0-runtime rollback" in prerm and "#NAME#" not in postinst + prerm
    lint = subprocess.run(["lintian", "--fail-on", "error,warning", str(deb)], capture_output=True, text=True)
    assert lint.returncode == 0 and not [line for line in lint.stdout.splitlines() if line[:2] in ("E:", "W:")], (
        lint.stdout + lint.stderr
    )
    corrupt = altered_copy(dummy_bundle, tmp_path / "corrupt")
    refused = bundle_deb(corrupt, "2")
    assert refused.returncode != 0 and "vlm.onnx does not match its sha256" in refused.stderr
    assert not (tmp_path / "out" / "pi0-bundle-demo_2_all.deb").exists()


@pytest.fixture(scope="module")
def chroot(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Debian bookworm made by debootstrap, with the package installed by dpkg (maintainer scripts ran)."""
    image = packaging_module("image")
    tree = tmp_path_factory.mktemp("chroot") / "rootfs"
    assert image.debootstrap(tree, "amd64"), "this test needs an amd64 host"
    (deb,) = dist.glob("pi0-runtime_*_amd64.deb")
    (tree / "var" / "cache" / "pi0").mkdir(parents=True)
    shutil.copyfile(deb, tree / "var" / "cache" / "pi0" / deb.name)
    image.install_in_chroot(tree, f"/var/cache/pi0/{deb.name}")
    return tree


def test_package_installs_user_store_and_venv(chroot: Path) -> None:
    assert (chroot / "opt/pi0-runtime/venv/bin/pi0-runtime").is_file()
    passwd = (chroot / "etc/passwd").read_text()
    assert "pi0-runtime:" in passwd and ":/usr/sbin/nologin" in passwd.split("pi0-runtime:", 1)[1].splitlines()[0]
    assert "pi0-runtime" in next(
        line for line in (chroot / "etc/group").read_text().splitlines() if line.startswith("HwHiAiUser:")
    )
    assert (chroot / "var/lib/pi0-runtime/bundles").is_dir()
    assert (chroot / "etc/systemd/system/multi-user.target.wants/pi0-runtime.service").is_symlink()
    verify = subprocess.run(
        ["systemd-analyze", "verify", f"--root={chroot}", "pi0-runtime.service"], capture_output=True, text=True
    )
    assert verify.returncode == 0 and verify.stderr == "", verify.stderr


@pytest.fixture(scope="module")
def chroot_serving(chroot: Path, dummy_bundle: Path) -> Path:
    """The chroot with the dummy bundle installed by the packaged `pi0-runtime install-bundle`."""
    shutil.copytree(dummy_bundle, chroot / "tmp" / "bundle")
    install = subprocess.run(
        ["chroot", str(chroot), "/usr/bin/pi0-runtime", "install-bundle", "/tmp/bundle", "--no-restart"],
        env=CHROOT_ENV,
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    assert (chroot / "var/lib/pi0-runtime/bundles/current").is_symlink()
    return chroot


def test_installed_daemon_serves_the_dummy_bundle(chroot_serving: Path, dummy_bundle: Path) -> None:
    chroot = chroot_serving
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(chroot / "run" / "pi0-notify.sock"))
    (chroot / "run" / "pi0-notify.sock").chmod(0o666)  # the daemon runs as its own user; systemd's socket is open to it
    notify.settimeout(120)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    # As the service runs it: the packaged ExecStart (config in /etc), as the pi0-runtime user.
    daemon = subprocess.Popen(
        [
            "chroot",
            "--userspec=pi0-runtime:pi0-runtime",
            str(chroot),
            "/opt/pi0-runtime/venv/bin/pi0-runtime",
            "serve",
            "--config",
            "/etc/pi0-runtime/runtime.toml",
            "--endpoint",
            endpoint,
        ],
        env={**CHROOT_ENV, "NOTIFY_SOCKET": "/run/pi0-notify.sock", "HOME": "/nonexistent"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while b"READY=1" not in notify.recv(4096):
            assert time.monotonic() < deadline and daemon.poll() is None
        spec = load_bundle(dummy_bundle).spec
        with PolicyClient(endpoint, timeout_s=60) as client:
            meta = client.metadata()
            reply = client.infer(observation_for(dummy_bundle, "transfer the cube"))
        assert meta.source == "preset:pi0-dummy" and meta.backend == "onnxruntime"
        assert reply["actions"].shape == (spec.chunk_size, spec.action_dim) and np.isfinite(reply["actions"]).all()
    finally:
        daemon.send_signal(signal.SIGTERM)
        out, _ = daemon.communicate(timeout=60)
        notify.close()
    assert daemon.returncode == 0, out
    assert "/var/lib/pi0-runtime/bundles/current" in out and "stopped" in out


class Booted:
    """The rootfs booted by systemd-nspawn: real systemd as PID 1 (sharing this machine's network, unless
    `private_network`)."""

    def __init__(self, tree: Path, log: Path, private_network: bool = False) -> None:
        command = ["systemd-nspawn", "-q", "--register=no", "--keep-unit", "--console=read-only", "-D", str(tree), "-b"]
        if private_network:  # loopback only: nothing outside the box can be reached
            command.insert(1, "--private-network")
        with open(log, "w") as out:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        self.log = log
        deadline = time.monotonic() + 60
        while True:
            children = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True).stdout
            if children.split():
                self.leader = children.split()[0]
                break
            assert self.process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)

    def run(self, *command: str) -> subprocess.CompletedProcess:
        return subprocess.run(["nsenter", "-t", self.leader, "-a", *command], capture_output=True, text=True)

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, *(f"--property={p}" for p in properties)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def wait_until_settled(self, unit: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.run("systemctl", "is-active", unit).stdout.strip()
            if state in ("active", "failed", "inactive") and self.run(
                "systemctl", "is-system-running"
            ).stdout.strip() not in ("initializing", "starting", ""):
                return state
            time.sleep(0.5)
        raise AssertionError(f"{unit} did not settle:\n{self.log.read_text()[-3000:]}")

    def poweroff(self) -> None:
        self.run("systemctl", "poweroff")
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def broken_but_consistent(bundle: Path, out: Path) -> Path:
    """A bundle whose files match its manifest but whose VLM graph cannot be loaded."""
    shutil.copytree(bundle, out)
    (out / "vlm.onnx").write_bytes(b"not an onnx graph")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"]["vlm.onnx"] = hashlib.sha256(b"not an onnx graph").hexdigest()
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


def flood_beyond_limit_nofile(endpoint: str, obs: dict, booted: Booted, n: int = 1300) -> None:
    """More connections than the unit's LimitNOFILE=1024, each with a malformed request, while a
    controller connected before keeps asking: it is served throughout, the daemon is not restarted (its
    watchdog pings need no new descriptor), the flood costs a few log lines, and once it ends new
    connections are served again."""
    context = zmq.Context()
    context.set(zmq.MAX_SOCKETS, n + 16)
    served = []
    with PolicyClient(endpoint, timeout_s=30, retries=0) as controller:
        served.append(controller.infer(obs)["actions"])
        flood = []
        for _ in range(n):
            sock = context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint)
            sock.send_multipart([b"", b"\xc1"])
            flood.append(sock)
        for _ in range(3):
            served.append(controller.infer(obs)["actions"])
        deadline = time.monotonic() + 20  # the ones the daemon could accept are answered by then
        answered = sum(bool(sock.poll(max(0, int(1000 * (deadline - time.monotonic()))))) for sock in flood)
        for sock in flood:
            sock.close(linger=0)
    context.term()
    print(f"\nflood of {n} connections under LimitNOFILE=1024: {answered} answered while it lasted")
    assert all(np.isfinite(a).all() for a in served) and 900 < answered < n
    with PolicyClient(endpoint, timeout_s=30, retries=2) as late:
        assert np.isfinite(late.infer(obs)["actions"]).all()
    journal = booted.run("journalctl", "-u", "pi0-runtime", "--no-pager").stdout
    assert booted.show("pi0-runtime.service", "NRestarts")["NRestarts"] == "0", journal[-3000:]
    assert 1 <= journal.count("refused") <= 10, journal[-2000:]


def test_service_under_real_systemd(
    chroot_serving: Path, dummy_bundle: Path, aloha_sim_bundle: Path, tmp_path: Path
) -> None:
    """Boot the rootfs: the unit with all its hardening starts the daemon (Type=notify, watchdog), it
    serves the client; install-bundle restarts it on a new bundle, rolls back from one that cannot
    start, `rollback` works; `systemctl stop` ends it cleanly."""
    chroot = chroot_serving
    port = free_port()
    config = chroot / "etc/pi0-runtime/runtime.toml"
    metrics = free_port()
    text = config.read_text().replace("tcp://127.0.0.1:5555", f"tcp://127.0.0.1:{port}")
    config.write_text(text.replace('"127.0.0.1:9464"', f'"127.0.0.1:{metrics}"'))
    incoming = chroot / "root" / "incoming"  # not /tmp: nspawn mounts a fresh tmpfs there
    shutil.copytree(aloha_sim_bundle, incoming / "second")
    broken_but_consistent(dummy_bundle, incoming / "broken")
    endpoint = f"tcp://127.0.0.1:{port}"

    def source() -> str:
        with PolicyClient(endpoint, timeout_s=30, retries=0) as client:
            return client.metadata().source

    booted = Booted(chroot, tmp_path / "boot.log")
    try:
        assert booted.wait_until_settled("pi0-runtime.service") == "active", booted.run(
            "journalctl", "-u", "pi0-runtime"
        ).stdout
        state = booted.show("pi0-runtime.service", "StatusText", "NRestarts", "User", "WatchdogUSec")
        assert (
            state["StatusText"].startswith("serving") and state["NRestarts"] == "0" and state["User"] == "pi0-runtime"
        )
        # The hardening as systemd applied it to the running daemon (not as the unit file spells it).
        hardening = booted.show(
            "pi0-runtime.service", "Type", "Restart", "NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp",
            "DevicePolicy", "MainPID",
        )  # fmt: skip
        assert {k: v for k, v in hardening.items() if k != "MainPID"} == {
            "Type": "notify",
            "Restart": "on-failure",
            "NoNewPrivileges": "yes",
            "ProtectSystem": "strict",
            "ProtectHome": "yes",
            "PrivateTmp": "yes",
            "DevicePolicy": "closed",
        }
        allowed = booted.run("systemctl", "show", "pi0-runtime.service", "--property=DeviceAllow").stdout
        for device in ("/dev/davinci_manager", "/dev/devmm_svm", "/dev/hisi_hdc", "/dev/davinci0"):
            assert re.search(rf"{device} rw", allowed), allowed  # the 310P's devices, and only for the service
        status = booted.run("cat", f"/proc/{hardening['MainPID']}/status").stdout
        assert re.search(r"^NoNewPrivs:\s+1$", status, re.M) and re.search(r"^CapBnd:\s+0+$", status, re.M), status
        spec = load_bundle(dummy_bundle).spec
        with PolicyClient(endpoint, timeout_s=30) as client:
            actions = client.infer(observation_for(dummy_bundle, "transfer the cube"))["actions"]
        assert actions.shape == (spec.chunk_size, spec.action_dim) and np.isfinite(actions).all()
        # The packaged config's metrics and health endpoint, from outside the box (the unit's network is the host's).
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/readyz", timeout=10) as ready:
            assert ready.status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as scraped:
            assert re.search(r"^pi0_request_success_total\{.*\} 1\.0$", scraped.read().decode(), re.M)
        limits = booted.show("pi0-runtime.service", "MemoryHigh", "MemoryMax", "LimitNOFILE")
        assert limits == {"MemoryHigh": str(3 * 2**30), "MemoryMax": str(4 * 2**30), "LimitNOFILE": "1024"}
        flood_beyond_limit_nofile(endpoint, observation_for(dummy_bundle, "transfer the cube"), booted)
        time.sleep(16)  # WatchdogSec=30: pings every 15 s
        assert booted.show("pi0-runtime.service", "WatchdogTimestamp")["WatchdogTimestamp"]

        installed = booted.run("pi0-runtime", "install-bundle", "/root/incoming/second")
        assert installed.returncode == 0, installed.stdout + installed.stderr
        assert "restarted and ready" in installed.stdout and source() == "lerobot"

        failed = booted.run("pi0-runtime", "install-bundle", "/root/incoming/broken")
        assert failed.returncode == 1 and "is current again" in failed.stdout, failed.stdout + failed.stderr
        assert booted.run("systemctl", "is-active", "pi0-runtime").stdout.strip() == "active" and source() == "lerobot"

        assert booted.run("pi0-runtime", "rollback").returncode == 0 and source() == "preset:pi0-dummy"

        # CURVE inside the hardened unit, on a non-loopback bind: the daemon's pair made on the box (its
        # secret readable by the service's group), a controller's public key on the allow-list.
        curve = "/etc/pi0-runtime/curve"
        made = booted.run("pi0-runtime", "keygen", "daemon", "--dir", curve, "--group", "pi0-runtime")
        assert made.returncode == 0, made.stdout + made.stderr
        (chroot / curve.lstrip("/") / "clients").mkdir()
        zmq_auth.create_certificates(str(tmp_path), "controller")
        shutil.copy(tmp_path / "controller.key", chroot / curve.lstrip("/") / "clients")
        config.write_text(
            config.read_text().replace(endpoint, f"tcp://0.0.0.0:{port}")
            + f'curve_server_key = "{curve}/daemon.key_secret"\ncurve_allowed_clients = "{curve}/clients"\n'
        )
        restarted = booted.run("systemctl", "restart", "pi0-runtime")
        assert restarted.returncode == 0, booted.run("journalctl", "-u", "pi0-runtime", "--no-pager").stdout[-3000:]
        keys = {
            "server_key": str(chroot / curve.lstrip("/") / "daemon.key"),
            "client_key": str(tmp_path / "controller.key_secret"),
        }
        with PolicyClient(endpoint, timeout_s=30, **keys) as client:
            assert client.metadata().source == "preset:pi0-dummy"
        with PolicyClient(endpoint, timeout_s=2, retries=0) as outsider, pytest.raises(ServerUnavailableError):
            outsider.ping()

        assert booted.run("systemctl", "stop", "pi0-runtime").returncode == 0
        result = booted.show("pi0-runtime.service", "Result", "ExecMainStatus", "ActiveState")
        assert result == {"Result": "success", "ExecMainStatus": "0", "ActiveState": "inactive"}
        journal = booted.run("journalctl", "-u", "pi0-runtime", "--no-pager").stdout
        assert "finishing the one in flight" in journal and "stopped" in journal
    finally:
        booted.poweroff()


# --- fleet rollout over apt ------------------------------------------------------------------------------


def restamped(deb: Path, version: str, out: Path) -> Path:
    """`deb` as another version, its files unchanged: the next runtime release, without a second build."""
    tree = out / "restamp"
    subprocess.run(["dpkg-deb", "--raw-extract", str(deb), str(tree)], check=True)
    control = tree / "DEBIAN" / "control"
    control.write_text(re.sub(r"(?m)^Version: .*$", f"Version: {version}", control.read_text()))
    new = out / f"pi0-runtime_{version}_amd64.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(tree), str(new)], check=True)
    shutil.rmtree(tree)
    return new


def corrupted(deb: Path, name: str, out: Path) -> Path:
    """A bundle package whose bundle file no longer matches the manifest it carries (made by hand, as
    bundle_deb.py refuses to package such a bundle)."""
    tree = out / "corrupted"
    subprocess.run(["dpkg-deb", "--raw-extract", str(deb), str(tree)], check=True)
    vlm = tree / "usr/share/pi0-bundles" / name / "vlm.onnx"
    data = bytearray(vlm.read_bytes())
    data[len(data) // 3] ^= 0x40
    vlm.write_bytes(data)
    bad = out / deb.name
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(tree), str(bad)], check=True)
    shutil.rmtree(tree)
    return bad


def forge_index(dists: Path) -> None:
    """What someone without the key can do to a published repository: offer a new version in the Packages
    index and rewrite the hashes in InRelease to match. Its signature no longer matches."""
    packages = dists / "main/binary-amd64/Packages"
    text = packages.read_text().replace("Version: 2\n", "Version: 9\n", 1)
    packages.write_text(text)
    (dists / "main/binary-amd64/Packages.gz").write_bytes(gzip.compress(text.encode(), mtime=0))
    algorithms = {"MD5Sum": "md5", "SHA1": "sha1", "SHA256": "sha256", "SHA512": "sha512"}
    lines, algorithm = [], None
    for line in (dists / "InRelease").read_text().splitlines(keepends=True):
        if not line.startswith(" "):
            algorithm = algorithms.get(line.split(":", 1)[0])
        elif algorithm and len(line.split()) == 3:
            data = (dists / line.split()[2]).read_bytes()
            line = f" {hashlib.new(algorithm, data).hexdigest()} {len(data):16d} {line.split()[2]}\n"
        lines.append(line)
    (dists / "InRelease").write_text("".join(lines))


def test_fleet_rollout_over_apt(
    chroot: Path, dist: Path, dummy_bundle: Path, aloha_sim_bundle: Path, tmp_path: Path
) -> None:
    """`repo.py` makes a signed apt repository (a throwaway key) of pi0-runtime at two versions and the
    bundle package pi0-bundle-demo at two (the dummy bundle, then the aloha-sim one). The box, booted with
    no network, adds it with `signed-by`, installs the bundle, upgrades runtime and bundle together (the
    service restarted once, the new bundle served, the old one kept as `previous`, the config's local edit
    kept), downgrades the bundle (the old one served again, from the store: no second copy), removes it
    (back to the previous bundle). A bundle package whose files do not match its manifest fails in its
    postinst and changes nothing; a .deb altered in the pool, an index edited without the key and a
    repository signed by another key are refused by apt, and nothing on the box changes."""
    (runtime,) = dist.glob("pi0-runtime_*_amd64.deb")  # the version the chroot has installed
    version = runtime.name.split("_")[1]
    builds = tmp_path / "builds"
    builds.mkdir()
    runtime_next = restamped(runtime, f"{version}+fleet2", builds)
    (tmp_path / "broken").mkdir()
    made = script("bundle_deb", "--bundle", aloha_sim_bundle, "--name", "broken", "--version", 1, "--out", builds)
    assert made.returncode == 0, made.stderr
    broken = corrupted(Path(made.stdout.split()[-1]), "broken", tmp_path / "broken")
    repo = tmp_path / "repo"
    bundles = ["--bundle", f"demo={dummy_bundle}:1", "--bundle", f"demo={aloha_sim_bundle}:2"]
    made = script("repo", "--out", repo, "--deb", runtime, "--deb", runtime_next, *bundles, "--deb", broken)
    assert made.returncode == 0, made.stdout + made.stderr
    assert "THROWAWAY key" in made.stderr and f"pi0-runtime {version}+fleet2" in made.stdout

    # The box: the repository as a file: source (signed-by its keyring), no other source, no network; an
    # empty store; the packaged config with a local edit (a conffile: it must survive the upgrade).
    shutil.copytree(repo, chroot / "srv/pi0-repo")
    shutil.copyfile(repo / "pi0-fleet.gpg", chroot / "usr/share/keyrings/pi0-fleet.gpg")
    sources = "deb [signed-by=/usr/share/keyrings/pi0-fleet.gpg] file:/srv/pi0-repo bookworm main\n"
    (chroot / "etc/apt/sources.list.d/pi0-fleet.list").write_text(sources)
    assert "deb.debian.org" in (chroot / "etc/apt/sources.list").read_text()  # debootstrap's mirror: off
    (chroot / "etc/apt/sources.list").write_text("# this box has no network: /etc/apt/sources.list.d/pi0-fleet.list\n")
    store = chroot / "var/lib/pi0-runtime/bundles"
    for entry in store.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    config = chroot / "etc/pi0-runtime/runtime.toml"
    config.write_text((ROOT / "appliance/config/runtime.toml").read_text() + 'robot = "fleet-test-07"\n')

    booted = Booted(chroot, tmp_path / "boot.log", private_network=True)

    def box(*command: str) -> subprocess.CompletedProcess:
        env = ["env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL=C", "DEBIAN_FRONTEND=noninteractive"]
        return booted.run(*env, *command)

    def apt(*args: str) -> subprocess.CompletedProcess:  # as docs/deploy.md's fleet recipe runs it
        keep_config = ["-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold"]
        return box("apt-get", "-y", "-q", *keep_config, *args)

    def starts() -> int:
        """How often the service was started in this boot (a restart is a start)."""
        journal = box("journalctl", "-b", "-u", "pi0-runtime", "-o", "cat", "--no-pager").stdout
        return sum(line.startswith("Started pi0-runtime.service") for line in journal.splitlines())

    def served() -> str:
        code = (  # the box's own client (in the runtime's venv): the service listens on the box's loopback
            "from pi0_client import PolicyClient\n"
            "with PolicyClient('tcp://127.0.0.1:5555', timeout_s=30, retries=0) as client:\n"
            "    print(client.metadata().source)\n"
        )
        result = box("/opt/pi0-runtime/venv/bin/python", "-c", code)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    def links() -> tuple[str | None, str | None]:
        return tuple(os.readlink(store / n) if (store / n).is_symlink() else None for n in ("current", "previous"))

    def installed() -> dict[str, str]:
        query = box("dpkg-query", "-W", "-f", "${Package} ${Version} ${db:Status-Abbrev}\n", "pi0-*")
        return {line.split()[0]: " ".join(line.split()[1:]) for line in query.stdout.splitlines()}

    try:
        assert booted.wait_until_settled("pi0-runtime.service") == "inactive"  # no bundle yet
        updated = box("apt-get", "update", "--error-on=any")
        assert updated.returncode == 0 and "deb.debian.org" not in updated.stdout, updated.stdout + updated.stderr

        step = apt("install", "pi0-bundle-demo=1")
        assert step.returncode == 0, step.stdout + step.stderr
        assert served() == "preset:pi0-dummy" and starts() == 1
        first, _ = links()
        assert first is not None and links() == (first, None)

        invocation = booted.show("pi0-runtime.service", "InvocationID")["InvocationID"]
        step = apt("upgrade")  # what a fleet runs: both packages, one dpkg run
        assert step.returncode == 0, step.stdout + step.stderr
        assert installed() == {"pi0-runtime": f"{version}+fleet2 ii", "pi0-bundle-demo": "2 ii"}
        assert starts() == 2 and booted.show("pi0-runtime.service", "InvocationID")["InvocationID"] != invocation
        assert "not again" in step.stdout  # the runtime's own restart left to the bundle's
        assert served() == "lerobot"
        second, previous = links()
        assert previous == first and second != first and (store / first / "manifest.json").is_file()
        assert 'robot = "fleet-test-07"' in config.read_text()

        step = apt("install", "--allow-downgrades", "pi0-bundle-demo=1")
        assert step.returncode == 0, step.stdout + step.stderr
        assert "rolling back to it" in step.stdout and starts() == 3 and served() == "preset:pi0-dummy"
        assert links() == (first, second) and sorted(p.name for p in store.iterdir()) == sorted(
            [first, second, "current", "previous"]
        )

        step = apt("install", "pi0-bundle-broken")
        output = step.stdout + step.stderr
        assert step.returncode != 0 and "vlm.onnx does not match its sha256" in output, output
        assert "pi0-bundle-broken: the bundle in /usr/share/pi0-bundles/broken is not served" in output
        assert links() == (first, second) and starts() == 3 and served() == "preset:pi0-dummy"
        assert box("dpkg", "--purge", "pi0-bundle-broken").returncode == 0 and links() == (first, second)

        step = apt("remove", "pi0-bundle-demo")
        assert step.returncode == 0, step.stdout + step.stderr
        assert links() == (second, first) and starts() == 4 and served() == "lerobot"
        assert not (chroot / "usr/share/pi0-bundles/demo").exists()
        state = (links(), starts(), installed())

        # Tampering: a byte of a .deb in the pool; nothing is installed.
        pooled = chroot / "srv/pi0-repo/pool/main/p/pi0-bundle-demo/pi0-bundle-demo_1_all.deb"
        original = pooled.read_bytes()
        pooled.write_bytes(original[:1000] + bytes([original[1000] ^ 1]) + original[1001:])
        step = apt("install", "pi0-bundle-demo=1")
        assert step.returncode != 0 and "Hash Sum mismatch" in step.stdout + step.stderr, step.stdout + step.stderr
        pooled.write_bytes(original)
        # An index edited without the key: apt refuses it and keeps the index it had.
        forge_index(chroot / "srv/pi0-repo/dists/bookworm")
        step = box("apt-get", "update", "--error-on=any")
        assert step.returncode != 0 and "BADSIG" in step.stdout + step.stderr, step.stdout + step.stderr
        # The repository signed by another key (a new bundle version added, a new throwaway key).
        resigned = script("repo", "--out", chroot / "srv/pi0-repo", "--bundle", f"demo={dummy_bundle}:3")
        assert resigned.returncode == 0, resigned.stdout + resigned.stderr
        step = box("apt-get", "update", "--error-on=any")
        assert step.returncode != 0 and "NO_PUBKEY" in step.stdout + step.stderr, step.stdout + step.stderr
        policy = box("apt-cache", "policy", "pi0-bundle-demo").stdout
        assert "Candidate: 2" in policy and " 9 " not in policy and " 3 " not in policy, policy
        assert (links(), starts(), installed()) == state and served() == "lerobot"
    finally:
        booted.poweroff()
