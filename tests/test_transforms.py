"""The numpy transforms of runtime/, against hand-computed values and against PyTorch's own resize."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from runtime.bundle.conventions import LEROBOT_03, OPENPI
from runtime.bundle.spec import NormStats
from runtime.pipeline import transforms as T


def test_to_chw_accepts_both_layouts() -> None:
    hwc = np.arange(2 * 5 * 3).reshape(2, 5, 3)
    assert T.to_chw(hwc).shape == (3, 2, 5)
    assert T.to_chw(hwc)[1, 0, 4] == hwc[0, 4, 1]
    chw = np.zeros((3, 2, 5))
    assert T.to_chw(chw) is chw
    with pytest.raises(ValueError, match="HxWx3 or 3xHxW"):
        T.to_chw(np.zeros((2, 5, 4)))


def test_to_unit_float() -> None:
    out = T.to_unit_float(np.array([0, 51, 255], dtype=np.uint8))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, np.array([0.0, 0.2, 1.0], dtype=np.float32))
    np.testing.assert_array_equal(T.to_unit_float(np.array([0.5])), [0.5])
    with pytest.raises(ValueError, match="uint8 or float"):
        T.to_unit_float(np.array([1], dtype=np.int16))


def test_bilinear_upsample_by_hand() -> None:
    image = np.array([[[0.0, 1.0], [2.0, 3.0]]], dtype=np.float32)
    expected = [[0.0, 0.25, 0.75, 1.0], [0.5, 0.75, 1.25, 1.5], [1.5, 1.75, 2.25, 2.5], [2.0, 2.25, 2.75, 3.0]]
    np.testing.assert_allclose(T.resize_bilinear(image, 4, 4)[0], expected, atol=1e-7)


def test_bilinear_downsample_by_hand() -> None:
    image = np.array([[[0.0, 1.0, 2.0, 3.0]]], dtype=np.float32)
    # Output pixel j samples x = 2j + 0.5: the mean of each neighbouring pair.
    np.testing.assert_allclose(T.resize_bilinear(image, 1, 2)[0], [[0.5, 2.5]])


@pytest.mark.parametrize("src,dst", [((480, 640), (168, 224)), ((240, 320), (168, 224)), ((97, 31), (224, 71))])
def test_bilinear_matches_torch(src: tuple[int, int], dst: tuple[int, int]) -> None:
    image = np.random.default_rng(0).random((3, *src), dtype=np.float32)
    ours = T.resize_bilinear(image, *dst)
    theirs = F.interpolate(torch.from_numpy(image)[None], size=dst, mode="bilinear", align_corners=False)[0].numpy()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=3e-7)  # a couple of float32 ulps


def test_resize_with_pad_modes_by_hand() -> None:
    image = np.ones((1, 2, 4), dtype=np.float32)  # already 4 wide: no resize, 2 rows of padding
    left_top = T.resize_with_pad(image, 4, 4, "left_top")
    np.testing.assert_array_equal(left_top[0, :, 0], [0, 0, 1, 1])
    center = T.resize_with_pad(image, 4, 4, "center")
    np.testing.assert_array_equal(center[0, :, 0], [0, 1, 1, 0])
    tall = np.ones((1, 4, 2), dtype=np.float32)
    np.testing.assert_array_equal(T.resize_with_pad(tall, 4, 4, "left_top")[0, 0], [0, 0, 1, 1])


def test_resize_with_pad_camera_frame() -> None:
    frame = np.full((3, 480, 640), 0.5, dtype=np.float32)
    out = T.resize_with_pad(frame, 224, 224, "left_top")
    assert out.shape == (3, 224, 224)
    # 480x640 scales by 224/640 to 168x224: 56 rows of black on top, the image below.
    assert (out[:, :56] == 0).all() and np.allclose(out[:, 56:], 0.5)


def test_prepare_image_layouts_agree_and_scale() -> None:
    hwc = np.random.default_rng(1).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    from_hwc = T.prepare_image(hwc, (224, 224), LEROBOT_03)
    from_chw = T.prepare_image(hwc.transpose(2, 0, 1), (224, 224), LEROBOT_03)
    np.testing.assert_array_equal(from_hwc, from_chw)
    assert from_hwc.dtype == np.float32 and from_hwc.min() >= -1 and from_hwc.max() <= 1
    assert (from_hwc[:, :56] == -1).all()  # padding is black, i.e. -1 after scaling
    np.testing.assert_array_equal(T.to_symmetric(np.array([0.0, 0.5, 1.0], np.float32)), [-1.0, 0.0, 1.0])
    assert (T.empty_camera_image((224, 224)) == -1).all()


def test_openpi_resize_is_pillows_centered_and_leaves_224_alone() -> None:
    frame = np.random.default_rng(3).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    out = T.prepare_image(frame.transpose(2, 0, 1), (224, 224), OPENPI)
    # 480x640 -> 168x224, 28 black rows above and below (openpi_client's int((224 - 168) / 2)).
    assert (out[:, :28] == -1).all() and (out[:, 196:] == -1).all() and not (out[:, 28] == -1).all()
    from PIL import Image

    pillow = np.asarray(Image.fromarray(frame).resize((224, 168), resample=Image.BILINEAR))
    np.testing.assert_array_equal(out[:, 28:196], pillow.transpose(2, 0, 1).astype(np.float32) / 255 * 2 - 1)
    at_size = frame[:224, :224]
    expected = at_size.transpose(2, 0, 1).astype(np.float32) / np.float32(255) * np.float32(2) - np.float32(1)
    np.testing.assert_array_equal(T.prepare_image(at_size, (224, 224), OPENPI), expected)
    with pytest.raises(ValueError, match="uint8"):
        T.prepare_image(frame.astype(np.float32) / 255, (224, 224), OPENPI)


def test_pad_vector() -> None:
    np.testing.assert_array_equal(T.pad_vector(np.array([1.0, 2.0]), 4), [1, 2, 0, 0])
    assert T.pad_vector(np.ones((2, 3, 7)), 32).shape == (2, 3, 32)
    with pytest.raises(ValueError, match="does not fit"):
        T.pad_vector(np.ones(33), 32)


def test_mean_std_by_hand_and_round_trip() -> None:
    stats = NormStats(mean=[1.0, 2.0], std=[2.0, 4.0], eps=0.0)
    np.testing.assert_array_equal(T.normalize(np.array([3.0, 6.0]), stats), [1.0, 1.0])
    np.testing.assert_array_equal(T.unnormalize(np.array([1.0, 1.0]), stats), [3.0, 6.0])
    lerobot = NormStats(mean=[0.5, -1.0, 3.0], std=[0.1, 2.0, 0.0], eps=1e-8)  # a constant dimension: std 0
    x = np.array([0.7, 1.0, 3.0], dtype=np.float32)
    np.testing.assert_allclose(T.normalize(x, lerobot), [2.0, 1.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(T.unnormalize(T.normalize(x, lerobot), lerobot), x, rtol=1e-6)
    # Statistics longer than the vector (openpi stores them padded) apply to its leading dims.
    np.testing.assert_allclose(T.normalize(np.array([0.6]), lerobot), [1.0], rtol=1e-6)


def test_quantiles_by_hand_and_round_trip() -> None:
    stats = NormStats(q01=[0.0, -2.0], q99=[2.0, 2.0], eps=0.0, mode="quantiles")
    np.testing.assert_array_equal(T.normalize(np.array([1.0, 2.0]), stats), [0.0, 1.0])
    openpi = NormStats(q01=[0.0, -2.0, 1.0], q99=[2.0, 2.0, 1.0], eps=1e-6, mode="quantiles")
    x = np.array([0.5, -1.0], dtype=np.float32)
    np.testing.assert_allclose(
        T.normalize(x, openpi), [(0.5 / (2 + 1e-6)) * 2 - 1, (1.0 / (4 + 1e-6)) * 2 - 1], rtol=1e-6
    )
    np.testing.assert_allclose(T.unnormalize(T.normalize(x, openpi), openpi), x, rtol=1e-6)
    with pytest.raises(ValueError, match="q01 and q99"):
        NormStats(mean=[0.0], std=[1.0], mode="quantiles")


def test_discretized_state_bins_by_hand() -> None:
    # openpi: np.digitize(s, linspace(-1, 1, 257)[:-1]) - 1, so bins of width 2/256 from -1.
    state = np.array([-1.5, -1.0, -0.99, 0.0, 0.999, 1.0, 3.0])
    np.testing.assert_array_equal(T.discretize_state(state), [-1, 0, 1, 128, 255, 255, 255])


def test_aloha_grippers_by_hand() -> None:
    # Fully open (0.058 m): the arcsin argument is exactly 1, so the angle is pi/2.
    lerobot, openpi = LEROBOT_03.gripper_in, OPENPI.gripper_in
    np.testing.assert_allclose(
        T.aloha_gripper_to_angular(np.array([1.0]), lerobot), [(math.pi / 2 - 0.4) / 1.1], rtol=1e-6
    )
    np.testing.assert_allclose(
        T.aloha_gripper_to_angular(np.array([1.0]), openpi), [(math.pi / 2 - 0.5476) / (1.6296 - 0.5476)], rtol=1e-6
    )
    np.testing.assert_allclose(
        T.aloha_gripper_from_angular(np.array([0.0]), LEROBOT_03.gripper_out), [(0.4 + 0.6213) / 2.1123], rtol=1e-6
    )
    # openpi does not scale the model's gripper output, only shifts it: x + 0.5476.
    np.testing.assert_allclose(
        T.aloha_gripper_from_angular(np.array([0.25]), OPENPI.gripper_out),
        [(0.25 + 0.5476 + 0.6213) / 2.1123],
        rtol=1e-6,
    )


def test_aloha_state_decoding_flips_joints() -> None:
    state = np.arange(1, 15, dtype=np.float32) / 20
    decoded = T.aloha_decode_state(state, LEROBOT_03)
    for i in range(14):
        if i in (1, 2, 8, 9):
            assert decoded[i] == -state[i]
        elif i in (6, 13):
            assert decoded[i] == pytest.approx(T.aloha_gripper_to_angular(state[i], LEROBOT_03.gripper_in))
        else:
            assert decoded[i] == state[i]
    assert state[1] > 0, "the input must not be modified"


@pytest.mark.parametrize("conventions", [LEROBOT_03, OPENPI], ids=lambda c: c.name)
def test_aloha_action_conventions_round_trip(conventions) -> None:
    actions = np.random.default_rng(2).normal(size=(1, 50, 14)).astype(np.float32)
    encoded = T.aloha_encode_actions(actions, conventions)
    assert not np.allclose(encoded, actions)
    np.testing.assert_allclose(T.aloha_encode_actions_inv(encoded, conventions), actions, atol=1e-5)
    again = T.aloha_encode_actions(T.aloha_encode_actions_inv(encoded, conventions), conventions)
    np.testing.assert_allclose(again, encoded, atol=1e-5)


def test_euler_times() -> None:
    times = T.euler_times(10)
    assert len(times) == 10 and times[0] == 1.0 and all(t.dtype == np.float32 for t in times)
    np.testing.assert_allclose(times, np.linspace(1.0, 0.1, 10), atol=1e-6)
    assert T.euler_times(1) == [1.0]
    assert len(T.euler_times(3)) == 3
