"""What goes onto the device: the systemd unit (checked by systemd's own tools), the bundle store with
its atomic switch and rollback (with a real daemon serving `current`), CANN's environment file."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import altered_copy, observation_for

from devtools.supervise import Daemon
from pi0_client.client import PolicyClient
from runtime.bundle.manifest import BundleError
from runtime.daemon.store import BundleStore
from runtime.npu import cann_environment, environment_file

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "appliance" / "systemd" / "pi0-runtime.service"
RUNTIME = Path(sys.executable).with_name("pi0-runtime")


def unit_for_this_machine(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's pi0-runtime (verify checks it is executable)."""
    text = UNIT.read_text().replace("/opt/pi0-runtime/venv/bin/pi0-runtime", str(RUNTIME))
    unit = tmp_path / UNIT.name
    unit.write_text(text)
    return unit


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit_for_this_machine(tmp_path))], capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stderr == "" and result.stdout == "", result.stderr


def test_unit_exposure_is_ok_or_better(tmp_path: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(unit_for_this_machine(tmp_path))],
        capture_output=True,
        text=True,
    )
    match = re.search(r"Overall exposure level for pi0-runtime.service: ([\d.]+) (\w+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0 and match.group(2) in ("PERFECT", "SAFE", "OK")


# --- the bundle store ----------------------------------------------------------------------------------


def serves(endpoint: str, spec_source: str) -> bool:
    with PolicyClient(endpoint, timeout_s=30) as client:
        return client.metadata().source == spec_source


def test_install_switch_rollback_and_a_corrupt_bundle(
    dummy_bundle: Path, aloha_sim_bundle: Path, tmp_path: Path
) -> None:
    store = BundleStore(tmp_path / "bundles")
    store.root.mkdir()
    first = store.install(dummy_bundle)
    assert store.current == first and store.previous is None
    with Daemon.serve(store.root / "current") as daemon:  # the daemon serves the `current` link
        second = store.install(aloha_sim_bundle)
        assert (store.current, store.previous) == (second, first)
        before = {p.name for p in store.root.iterdir()}
        with pytest.raises(BundleError, match=r"vlm\.onnx does not match its sha256"):
            store.install(altered_copy(dummy_bundle, tmp_path / "corrupt"))
        assert {p.name for p in store.root.iterdir()} == before  # no partial copy, links untouched
        assert (store.current, store.previous) == (second, first)
        # The daemon started on the first bundle still serves it, whatever the links do meanwhile.
        assert serves(daemon.endpoint, "preset:pi0-dummy")
        with PolicyClient(daemon.endpoint) as client:
            assert np.isfinite(client.infer(observation_for(dummy_bundle, "transfer the cube"))["actions"]).all()
    assert daemon.exit_code == 0
    assert store.rollback() == first and (store.current, store.previous) == (first, second)
    assert store.rollback() == second and (store.current, store.previous) == (second, first)
    assert [b.name for b in store.installed()] == [first, second]
    assert store.prune() == []


def test_store_command_line(dummy_bundle: Path, aloha_sim_bundle: Path, tmp_path: Path) -> None:
    store = tmp_path / "bundles"
    store.mkdir()

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(RUNTIME), *args, "--store", str(store)], capture_output=True, text=True)

    assert run("rollback", "--no-restart").returncode == 2  # nothing to roll back to
    assert run("install-bundle", str(dummy_bundle), "--no-restart").returncode == 0
    refused = run("install-bundle", str(altered_copy(dummy_bundle, tmp_path / "corrupt")), "--no-restart")
    assert refused.returncode == 2 and "vlm.onnx does not match its sha256" in refused.stdout
    assert run("install-bundle", str(aloha_sim_bundle), "--no-restart").returncode == 0
    listing = {line.split()[0]: line for line in run("bundles").stdout.splitlines()}
    assert set(listing) == {"current", "previous"} and "preset:pi0-dummy" in listing["previous"]
    assert run("rollback", "--no-restart").returncode == 0
    listing = {line.split()[0]: line for line in run("bundles").stdout.splitlines()}
    assert "preset:pi0-dummy" in listing["current"] and "lerobot" in listing["previous"]


def test_install_bundle_reuse_goes_by_content(
    dummy_bundle: Path, aloha_sim_bundle: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`install-bundle --reuse` (what a bundle package's postinst runs): the bundle is verified first,
    always; the store's `current` already: nothing; its `previous`: rolled back to, no second copy; a
    `previous` whose store copy no longer verifies: copied in afresh."""
    from runtime import cli

    caplog.set_level(logging.INFO, logger="pi0-runtime")
    root = tmp_path / "bundles"
    root.mkdir()
    store = BundleStore(root)

    def install(bundle: Path) -> int:
        return cli.main(["install-bundle", str(bundle), "--reuse", "--store", str(root), "--no-restart"])

    assert install(dummy_bundle) == 0
    first = store.current
    assert install(dummy_bundle) == 0 and "already: nothing to do" in caplog.text
    assert (store.current, store.previous) == (first, None)
    assert install(aloha_sim_bundle) == 0
    second = store.current
    assert install(dummy_bundle) == 0 and "rolling back to it" in caplog.text  # a downgrade
    assert (store.current, store.previous) == (first, second) and len(store.installed()) == 2
    corrupt = altered_copy(dummy_bundle, tmp_path / "corrupt")  # the same manifest, one file altered
    assert install(corrupt) == 2 and "vlm.onnx does not match its sha256" in caplog.text
    assert (store.current, store.previous) == (first, second)
    (root / second / "vlm.onnx").write_bytes(b"damaged")
    time.sleep(1.1)  # store names carry the second of the install
    assert install(aloha_sim_bundle) == 0 and "copying" in caplog.text
    assert store.current not in (first, second) and store.previous == first


# --- CANN's environment --------------------------------------------------------------------------------


def test_cann_environment_file(tmp_path: Path) -> None:
    set_env = tmp_path / "set_env.sh"
    set_env.write_text(
        "export ASCEND_TOOLKIT_HOME=/usr/local/Ascend/ascend-toolkit/latest\n"
        "export LD_LIBRARY_PATH=${ASCEND_TOOLKIT_HOME}/lib64:${LD_LIBRARY_PATH}\n"
        'export PATH=${ASCEND_TOOLKIT_HOME}/bin:$PATH\nexport ODD="a \\"quoted\\" value"\n'
    )
    variables = cann_environment(set_env)
    assert variables["ASCEND_TOOLKIT_HOME"] == "/usr/local/Ascend/ascend-toolkit/latest"
    assert variables["LD_LIBRARY_PATH"] == "/usr/local/Ascend/ascend-toolkit/latest/lib64:"
    assert variables["PATH"].startswith("/usr/local/Ascend/ascend-toolkit/latest/bin:/usr/local/sbin:")
    assert "HOME" not in variables and "PWD" not in variables
    out = tmp_path / "cann.env"
    result = subprocess.run(
        [str(RUNTIME), "cann-env", "--set-env", str(set_env), "--out", str(out)], capture_output=True, text=True
    )
    assert result.returncode == 0 and out.read_text() == environment_file(variables, set_env)
    assert 'ODD="a \\"quoted\\" value"' in out.read_text()
