"""Frames letterboxed by openpi's clients (`openpi_client.image_tools.resize_with_pad`, the real one from
openpi-client 0.1.2) reach the model where training put the scene; other aspect ratios are flagged."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FIXTURES
from openpi_client import image_tools

from exporter.checkpoint import load_checkpoint
from runtime.bundle.conventions import conventions_named
from runtime.pipeline import transforms
from runtime.pipeline.letterbox import undo_letterbox

TRAINED = (3, 480, 640)


def scene(seed: int = 0) -> np.ndarray:
    """A camera frame with content up to its edges (smooth, so that resizing keeps it recognisable)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(20, 236, (12, 16, 3), dtype=np.uint8)
    return np.kron(coarse, np.ones((40, 40, 1), dtype=np.uint8))  # 480x640x3, no black pixel


def test_openpis_letterbox_is_undone_to_its_content() -> None:
    frame = scene()
    sent = image_tools.convert_to_uint8(image_tools.resize_with_pad(frame, 224, 224))  # as openpi's examples send
    content, note = undo_letterbox(sent, TRAINED)
    assert content.shape == (3, 168, 224) and "letterboxed by the client" in note and "168x224 content" in note
    np.testing.assert_array_equal(content, sent[28:196].transpose(2, 0, 1))  # 28 black rows above and below
    chw, note = undo_letterbox(np.ascontiguousarray(sent.transpose(2, 0, 1)), TRAINED)  # CHW as ALOHA sends it
    assert chw.shape == (3, 168, 224) and note is not None


@pytest.mark.parametrize("shape", [(480, 640), (240, 320), (224, 298)])
def test_a_frame_of_the_cameras_aspect_is_left_alone(shape: tuple[int, int]) -> None:
    frame = np.zeros((*shape, 3), np.uint8)  # black, so a bar test alone would take it for a letterbox
    out, note = undo_letterbox(frame, TRAINED)
    assert out is frame and note is None


@pytest.mark.parametrize("shape", [(500, 1), (1, 700), (3, 5)])  # (500, 1): found by tests/test_fuzz.py
def test_a_frame_no_letterbox_could_make_is_served_as_it_is(shape: tuple[int, int]) -> None:
    frame = np.zeros((*shape, 3), np.uint8)
    out, note = undo_letterbox(frame, TRAINED)
    assert out is frame and note.endswith("served as it is")


def test_another_aspect_without_black_bars_is_flagged_and_served_as_it_is() -> None:
    frame = scene()[:, :480]  # 480x480: cropped, not letterboxed
    out, note = undo_letterbox(frame, TRAINED)
    assert out is frame and "another aspect ratio and no letterbox recognised" in note


def test_a_lerobot_policy_sees_an_openpi_clients_frame_where_training_put_it() -> None:
    """The LeRobot 0.3 ALOHA fixture (camera `top` trained at 480x640; LeRobot pads on the left and top):
    openpi's 224x224 letterbox, undone, gives the model nearly the image the full frame gives (only the
    client's antialiased resize differs); taken as it is, the scene would sit 28 rows lower."""
    spec = load_checkpoint(FIXTURES / "lerobot-pi0-tiny-aloha-sim" / "checkpoint").spec
    assert spec.conventions == "lerobot-0.3" and spec.camera_shapes[0] == TRAINED
    conventions, size = conventions_named(spec.conventions), spec.image_size
    frame = scene(1)
    sent = image_tools.convert_to_uint8(image_tools.resize_with_pad(frame, 224, 224))
    full = transforms.prepare_image(frame, size, conventions)
    undone = transforms.prepare_image(undo_letterbox(sent, TRAINED)[0], size, conventions)
    as_sent = transforms.prepare_image(sent, size, conventions)
    near, far = np.abs(undone - full).mean(), np.abs(as_sent - full).mean()
    print(f"\nmean abs from the full frame: undone {near:.4f}, as sent {far:.4f}")  # pytest -s
    assert near < 0.05 and far > 5 * near
