"""The bundle store through a power loss or a crash: `install-bundle`, its undo and `rollback` killed
(SIGKILL) at every file-system call they make, each leaving a store whose `current` verifies (the old
bundle or the new) and takes the next install; what is flushed before what; and a `current` that no
longer verifies at start: the daemon serves `previous`, says so, and `check` shows it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from conftest import BIN, free_port, observation_for

from pi0_client.client import PolicyClient
from runtime import cli
from runtime.bundle.manifest import MANIFEST, load_bundle, sha256_file
from runtime.daemon.store import CURRENT, PREVIOUS, BundleStore, load_served_bundle
from runtime.errors import ApplianceError

HELPER = Path(__file__).with_name("crash_install.py")
RUNTIME = BIN / "pi0-runtime"


def variant(bundle: Path, dest: Path, mark: int) -> Path:
    """A copy of `bundle` that verifies but is another bundle to the store (its manifest's bytes differ)."""
    shutil.copytree(bundle, dest)
    with (dest / MANIFEST).open("a") as manifest:
        manifest.write("\n" * mark)
    return dest


def suffix(bundle: Path) -> str:
    """How the store's name for `bundle` ends (the name is <UTC stamp>-<manifest sha256[:12]>)."""
    return sha256_file(bundle / MANIFEST)[:12]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, dummy_bundle: Path, aloha_sim_bundle: Path) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("crash-bundles")
    return {
        "old": aloha_sim_bundle,  # `previous` in the template store
        "current": dummy_bundle,  # `current` in the template store
        "new": variant(aloha_sim_bundle, work / "new", 1),  # what the killed install installs
        "next": variant(aloha_sim_bundle, work / "next", 2),  # what the install after the kill installs
    }


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory, bundles: dict[str, Path]) -> Path:
    """A store with `previous` (old) and `current` bundles, as a robot has after two updates."""
    store = BundleStore(tmp_path_factory.mktemp("crash-template") / "bundles")
    store.root.mkdir()
    store.install(bundles["old"])
    store.install(bundles["current"])
    return store.root


def kill_at_every_call(template: Path, work: Path, *argv: str, service_fails: bool = False, kill: bool = True) -> dict:
    """tests/crash_install.py: the command run once to the end, then once per call it makes, killed there."""
    flags = [*(["--service-fails"] if service_fails else []), *([] if kill else ["--trace-only"])]
    options = [str(template), str(work), *flags, "--", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, str(HELPER), *options], capture_output=True, text=True, env=env, timeout=600, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout)
    assert bool(result["runs"]) == kill and all(run["status"] == "signal 9" for run in result["runs"]), result["runs"]
    return result


def name_of(store: BundleStore, link: str, bundles: dict[str, Path]) -> str:
    """Which of `bundles` the store's `link` names (its target's manifest hash)."""
    target = getattr(store, link)
    matches = [key for key, bundle in bundles.items() if target is not None and target.endswith(suffix(bundle))]
    assert len(matches) == 1, (link, target)
    return matches[0]


def assert_serves_a_verified_bundle(
    root: Path, bundles: dict[str, Path], current: set[str], previous: set[str]
) -> None:
    """`current`, resolved as `serve` resolves it, verifies and is one of `current` (no fallback needed);
    `previous` verifies too; the next install succeeds and clears what the killed one left."""
    store = BundleStore(root)
    _, served = load_served_bundle(root / CURRENT)
    assert served.fell_back_from is None and not served.name.startswith(".")
    assert name_of(store, CURRENT, bundles) in current
    store.verified(PREVIOUS)
    assert name_of(store, PREVIOUS, bundles) in previous
    assert all(not b.name.startswith(".") for b in store.installed())
    before = store.current
    assert cli.main(["install-bundle", str(bundles["next"]), "--store", str(root), "--no-restart"]) == 0
    assert name_of(store, CURRENT, bundles) == "next" and store.previous == before
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")]  # leftovers cleaned up
    load_bundle(root / CURRENT)


def test_install_killed_at_every_call_leaves_a_verified_current(
    template: Path, bundles: dict[str, Path], tmp_path: Path
) -> None:
    argv = ("install-bundle", str(bundles["new"]), "--store", "{store}", "--no-restart")
    result = kill_at_every_call(template, tmp_path, *argv)
    assert result["exit_code"] == 0
    calls = [call[0] for call in result["trace"]]
    assert {"copyfile", "fsync", "rename", "replace"} <= set(calls) and len(result["runs"]) >= 20
    for run in result["runs"]:
        assert_serves_a_verified_bundle(Path(run["store"]), bundles, {"current", "new"}, {"old", "current"})
    complete = BundleStore(tmp_path / "complete")
    assert (name_of(complete, CURRENT, bundles), name_of(complete, PREVIOUS, bundles)) == ("new", "current")


def test_install_undone_killed_at_every_call_leaves_a_verified_current(
    template: Path, bundles: dict[str, Path], tmp_path: Path
) -> None:
    """The service does not start on the new bundle: install-bundle puts the links back and removes it."""
    argv = ("install-bundle", str(bundles["new"]), "--store", "{store}")
    result = kill_at_every_call(template, tmp_path, *argv, service_fails=True)
    assert result["exit_code"] == 1
    for run in result["runs"]:
        assert_serves_a_verified_bundle(Path(run["store"]), bundles, {"current", "new"}, {"old", "current"})
    complete = BundleStore(tmp_path / "complete")
    assert (name_of(complete, CURRENT, bundles), name_of(complete, PREVIOUS, bundles)) == ("current", "old")
    assert len(complete.installed()) == 2


def test_rollback_killed_at_every_call_leaves_a_verified_current(
    template: Path, bundles: dict[str, Path], tmp_path: Path
) -> None:
    result = kill_at_every_call(template, tmp_path, "rollback", "--store", "{store}", "--no-restart")
    assert result["exit_code"] == 0
    for run in result["runs"]:
        assert_serves_a_verified_bundle(Path(run["store"]), bundles, {"current", "old"}, {"old", "current"})


def test_install_flushes_the_copy_before_its_rename_and_the_store_after_each_switch(
    template: Path, bundles: dict[str, Path], tmp_path: Path
) -> None:
    argv = ("install-bundle", str(bundles["new"]), "--store", "{store}", "--no-restart")
    result = kill_at_every_call(template, tmp_path, *argv, kill=False)
    root = str(tmp_path / "complete")
    trace = result["trace"]
    into_place = next(i for i, c in enumerate(trace) if c[0] == "rename" and Path(c[2]).parent == Path(root))
    copy = Path(trace[into_place][1])
    flushed = {Path(c[1]) for c in trace[:into_place] if c[0] == "fsync"}
    files = {copy / p.relative_to(bundles["new"]) for p in bundles["new"].rglob("*")}
    assert files | {copy} <= flushed  # every file and directory of the copy, before its name is in the store
    switches = [i for i, c in enumerate(trace) if c[0] == "replace"]
    assert [Path(trace[i][2]).name for i in switches] == [PREVIOUS, CURRENT]
    for i in (into_place, *switches):  # the store directory flushed before anything else changes
        assert trace[i + 1] == ["fsync", root], trace[i : i + 2]


def test_install_replaces_a_bundle_left_by_an_interrupted_install(
    template: Path, bundles: dict[str, Path], tmp_path: Path
) -> None:
    """Renamed into place, links never switched: installing it again works (same name or not)."""
    root = tmp_path / "bundles"
    shutil.copytree(template, root, symlinks=True)
    store = BundleStore(root)
    before = store.current, store.previous
    name = store.install(bundles["new"])
    store._point(CURRENT, before[0])  # as if the power went before the links were switched
    store._point(PREVIOUS, before[1])
    (root / ".incoming-x" / "bundle").mkdir(parents=True)  # and a copy in flight
    (root / f".{CURRENT}.12345").symlink_to(name)
    assert (store.current, store.previous) == before and name in {b.name for b in store.installed()}
    again = store.install(bundles["new"])
    assert store.current == again and store.previous == before[0]
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")]


# --- a `current` that no longer verifies at start ------------------------------------------------------


def store_with(tmp_path: Path, previous: Path, current: Path) -> BundleStore:
    store = BundleStore(tmp_path / "bundles")
    store.root.mkdir()
    store.install(previous)
    store.install(current)
    return store


def corrupt(store: BundleStore, link: str, how: str) -> str:
    """Damage the bundle behind `link` as a power loss or a disk might; -> the reason expected."""
    directory = store.root / getattr(store, link)
    if how == "file deleted":
        (directory / "vlm.onnx").unlink()
        return "bundle file vlm.onnx is missing"
    if how == "byte flipped":
        data = bytearray((directory / "expert.onnx").read_bytes())
        data[len(data) // 2] ^= 0x01
        (directory / "expert.onnx").write_bytes(bytes(data))
        return "bundle file expert.onnx does not match its sha256"
    shutil.rmtree(directory)
    return f"`{link}` points at {directory.name}, which is not in the store"


def check_report(*argv: str) -> tuple[int, dict | None, str]:
    """`pi0-runtime check ARGV` -> exit status, its JSON report (log lines share stdout), all output."""
    out = subprocess.run([str(RUNTIME), "check", *argv], capture_output=True, text=True, timeout=120)
    lines = out.stdout.splitlines()
    if "{" not in lines:
        return out.returncode, None, out.stdout + out.stderr
    start = lines.index("{")
    report = json.loads("\n".join(lines[start : lines.index("}", start) + 1]))
    return out.returncode, report, out.stdout + out.stderr


@pytest.mark.filterwarnings("ignore:state outside the policy's training range")  # the synthetic state
@pytest.mark.parametrize("how", ["file deleted", "byte flipped", "directory removed"])
def test_a_current_that_fails_verification_is_not_served_previous_is(
    dummy_bundle: Path, aloha_sim_bundle: Path, tmp_path: Path, start_daemon, how: str
) -> None:
    store = store_with(tmp_path, dummy_bundle, aloha_sim_bundle)
    current, previous = store.current, store.previous
    reason = corrupt(store, CURRENT, how)
    port = free_port()
    config = tmp_path / "runtime.toml"
    config.write_text(f'metrics_endpoint = "127.0.0.1:{port}"\n')
    daemon = start_daemon(store.root / CURRENT, "--config", str(config))
    with PolicyClient(daemon.endpoint, timeout_s=30) as client:
        assert client.metadata().source == "preset:pi0-dummy"  # previous's
        assert client.infer(observation_for(dummy_bundle, "transfer the cube"))["actions"].size
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as scraped:
        info = [line for line in scraped.read().decode().splitlines() if line.startswith("pi0_bundle_info{")]
    assert len(info) == 1 and f'bundle="{previous}"' in info[0] and f'fell_back_from="{current}"' in info[0]
    warnings = [line for line in daemon.log().splitlines() if " WARNING " in line and "does not verify" in line]
    assert len(warnings) == 1 and current in warnings[0] and reason in warnings[0] and previous in warnings[0]
    assert (store.current, store.previous) == (current, previous)  # links left as they were
    code, report, output = check_report("--store", str(store.root))
    assert code == 0 and report is not None, output
    assert report["served"] == {
        "name": previous,
        "path": str(store.root / previous),
        "fell_back_from": current,
        "reason": report["served"]["reason"],
    }
    assert reason in report["served"]["reason"] and report["bundle"]["source"] == "preset:pi0-dummy"


def test_the_served_bundle_record(dummy_bundle: Path, aloha_sim_bundle: Path, tmp_path: Path) -> None:
    """What the daemon would put in `Service.served_bundle`: no fallback for a good `current` or a bundle
    directory; the fallback's source and reason otherwise."""
    store = store_with(tmp_path, dummy_bundle, aloha_sim_bundle)
    bundle, served = load_served_bundle(store.root / CURRENT)
    assert (served.name, served.path, served.fell_back) == (store.current, store.root / store.current, False)
    assert bundle.root == served.path  # loaded from the directory, not through the link
    assert load_served_bundle(dummy_bundle)[1].fell_back_from is None
    reason = corrupt(store, CURRENT, "file deleted")
    _, served = load_served_bundle(store.root / CURRENT)
    assert (served.name, served.fell_back_from, served.reason) == (store.previous, store.current, reason)
    code, report, _ = check_report("--bundle", str(store.root / CURRENT))  # the unit's path, as serve has it
    assert code == 0 and report["served"]["fell_back_from"] == store.current


@pytest.mark.parametrize("previous", ["corrupt", "missing", "same as current"])
def test_no_verified_bundle_is_one_line_and_exit_2(
    dummy_bundle: Path, aloha_sim_bundle: Path, tmp_path: Path, previous: str
) -> None:
    store = store_with(tmp_path, dummy_bundle, aloha_sim_bundle)
    reason = corrupt(store, CURRENT, "byte flipped")
    if previous == "corrupt":
        corrupt(store, PREVIOUS, "file deleted")
    elif previous == "missing":
        (store.root / PREVIOUS).unlink()
    else:
        store._point(PREVIOUS, store.current)
    with pytest.raises(ApplianceError, match=f"no bundle in .* verifies: current {store.current}: {reason}"):
        load_served_bundle(store.root / CURRENT)
    for argv in (["serve", "--bundle", str(store.root / CURRENT)], ["check", "--store", str(store.root)]):
        out = subprocess.run([str(RUNTIME), *argv], capture_output=True, text=True, timeout=120)
        errors = [line for line in (out.stdout + out.stderr).splitlines() if " ERROR " in line]
        assert out.returncode == 2 and "Traceback" not in out.stdout + out.stderr, out.stdout + out.stderr
        assert len(errors) == 1 and "verifies: current" in errors[0], out.stdout
