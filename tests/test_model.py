"""The network pieces against hand-computed values, pi0's masking semantics, and export-readiness."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from exporter.gemma import AdaptiveRMSNorm, RMSNorm, gated, rope
from exporter.pi0 import Pi0, attention_mask_2d, time_embedding
from exporter.presets import build_preset
from exporter.torch_backend import TorchBackend
from runtime.engine import sample as engine_sample
from runtime.pipeline.model_io import ModelInputs, initial_noise


def test_rms_norm_by_hand() -> None:
    norm = RMSNorm(2)
    x = torch.tensor([[3.0, 4.0]])
    rms = math.sqrt((9 + 16) / 2)
    torch.testing.assert_close(norm(x)[0], torch.tensor([[3 / rms, 4 / rms]]))
    norm.weight.data = torch.tensor([1.0, -0.5])  # Gemma scales by (1 + weight)
    torch.testing.assert_close(norm(x)[0], torch.tensor([[6 / rms, 2 / rms]]))
    assert norm(x)[1] is None


def test_adaptive_rms_norm_by_hand() -> None:
    """pi0.5: dense(cond) -> scale, shift, gate; norm(x) * (1 + scale) + shift, and the gate apart."""
    norm = AdaptiveRMSNorm(2, cond_dim=1)
    norm.dense.weight.data = torch.tensor([[1.0], [0.0], [0.5], [0.0], [2.0], [3.0]])
    norm.dense.bias.data = torch.zeros(6)
    x = torch.tensor([[[3.0, 4.0]]])
    rms = math.sqrt((9 + 16) / 2)
    normed, gate = norm(x, torch.tensor([[1.0]]))  # scale (1, 0), shift (0.5, 0), gate (2, 3)
    torch.testing.assert_close(normed, torch.tensor([[[2 * 3 / rms + 0.5, 4 / rms]]]))
    torch.testing.assert_close(gate, torch.tensor([[[2.0, 3.0]]]))
    torch.testing.assert_close(gated(x, torch.ones_like(x), gate), torch.tensor([[[5.0, 7.0]]]))


def test_rope_by_hand() -> None:
    x = torch.tensor([1.0, 0.0, 0.0, 1.0]).view(1, 1, 1, 4)  # halves (1, 0) and (0, 1)
    pos = torch.tensor([[2.0]])
    # Frequencies: 1 for the first pair, 1/10000**0.5 = 0.01 for the second.
    a, b = 2.0, 0.02
    expected = torch.tensor([math.cos(a), -math.sin(b), math.sin(a), math.cos(b)])
    torch.testing.assert_close(rope(x, pos).flatten(), expected)
    torch.testing.assert_close(rope(x, torch.zeros(1, 1)), x)


def test_attention_mask_2d_big_vision_examples() -> None:
    pad = torch.ones(1, 6, dtype=torch.bool)
    causal = attention_mask_2d(pad, torch.ones(1, 6, dtype=torch.bool))[0]
    torch.testing.assert_close(causal, torch.tril(torch.ones(6, 6, dtype=torch.bool)))
    prefix_lm = attention_mask_2d(pad, torch.tensor([[0, 0, 0, 1, 1, 1]], dtype=torch.bool))[0]
    assert prefix_lm[:3, :3].all() and not prefix_lm[:3, 3:].any()
    torch.testing.assert_close(prefix_lm[3:, 3:], torch.tril(torch.ones(3, 3, dtype=torch.bool)))
    padded = attention_mask_2d(torch.tensor([[1, 1, 0]], dtype=torch.bool), torch.zeros(1, 3, dtype=torch.bool))[0]
    assert padded[:2, :2].all() and not padded[2].any() and not padded[:, 2].any()


def test_time_embedding() -> None:
    emb = time_embedding(torch.tensor([0.0, 0.37]), 8)
    torch.testing.assert_close(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))  # sin first, then cos
    periods = 4e-3 * (4.0 / 4e-3) ** np.linspace(0, 1, 4)
    expected = np.concatenate([np.sin(2 * np.pi * 0.37 / periods), np.cos(2 * np.pi * 0.37 / periods)])
    np.testing.assert_allclose(emb[1].numpy(), expected, atol=1e-4)


def test_initial_noise_is_seeded_gaussian_never_zeros() -> None:
    spec = build_preset("pi0-dummy").spec
    a = initial_noise(spec, np.random.default_rng(7))
    assert a.shape == (1, spec.chunk_size, spec.max_action_dim) and a.dtype == np.float32
    np.testing.assert_array_equal(a, initial_noise(spec, np.random.default_rng(7)))
    assert not np.array_equal(a, initial_noise(spec, np.random.default_rng(8)))
    assert abs(a.std() - 1) < 0.1 and abs(a.mean()) < 0.1


@pytest.fixture(scope="module")
def dummy() -> Pi0:
    return build_preset("pi0-dummy", seed=3).model


def random_inputs(model: Pi0, seed: int, cams: int = 3, tokens: int = 8, chunk: int = 6):
    g = torch.Generator().manual_seed(seed)
    d = model.dims
    images = torch.rand(1, cams, 3, 224, 224, generator=g) * 2 - 1
    image_masks = torch.tensor([[True] * (cams - 1) + [False]])
    ids = torch.randint(0, d.vocab_size, (1, tokens), generator=g)
    token_mask = torch.arange(tokens)[None] < 5
    state = torch.randn(1, d.max_state_dim, generator=g)
    noise = torch.randn(1, chunk, d.max_action_dim, generator=g)
    return images, image_masks, ids, token_mask, state, noise


def sample(model: Pi0, images, image_masks, ids, token_mask, state, noise, num_steps: int) -> torch.Tensor:
    """The runtime's Euler loop over the PyTorch model, as the reference runs it."""
    inputs = ModelInputs(images.numpy(), image_masks.numpy(), ids.numpy(), token_mask.numpy(), state.numpy())
    return torch.from_numpy(engine_sample(TorchBackend(model), inputs, noise.numpy(), num_steps))


def test_masked_prefix_tokens_do_not_matter(dummy: Pi0) -> None:
    images, image_masks, ids, token_mask, state, noise = random_inputs(dummy, 0)
    base = sample(dummy, images, image_masks, ids, token_mask, state, noise, 3)
    other_images, other_ids = images.clone(), ids.clone()
    other_images[:, -1] = torch.rand_like(other_images[:, -1])  # the masked camera slot
    other_ids[:, 5:] = (other_ids[:, 5:] + 1) % dummy.dims.vocab_size  # the padded tokens
    torch.testing.assert_close(sample(dummy, other_images, image_masks, other_ids, token_mask, state, noise, 3), base)
    changed = ids.clone()
    changed[:, 0] = (changed[:, 0] + 1) % dummy.dims.vocab_size  # a real token does matter
    assert not torch.allclose(sample(dummy, images, image_masks, changed, token_mask, state, noise, 3), base)


def test_one_euler_step_is_noise_minus_velocity(dummy: Pi0) -> None:
    images, image_masks, ids, token_mask, state, noise = random_inputs(dummy, 1)
    keys, values, prefix_mask = dummy.prefix_kv(images, image_masks, ids, token_mask)
    v = dummy.velocity(state, noise, torch.ones(1), keys, values, prefix_mask)
    torch.testing.assert_close(sample(dummy, images, image_masks, ids, token_mask, state, noise, 1), noise - v)


def test_prefix_cache_shapes(dummy: Pi0) -> None:
    images, image_masks, ids, token_mask, *_ = random_inputs(dummy, 2)
    keys, values, prefix_mask = dummy.prefix_kv(images, image_masks, ids, token_mask)
    d = dummy.dims
    prefix_len = 3 * d.image_tokens + 8
    assert keys.shape == values.shape == (d.language.depth, 1, prefix_len, d.language.head_dim)
    assert prefix_mask.shape == (1, prefix_len) and prefix_mask.sum() == 2 * d.image_tokens + 5


class _Velocity(torch.nn.Module):
    def __init__(self, model: Pi0) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.model.velocity(*args)


class _Prefix(torch.nn.Module):
    def __init__(self, model: Pi0) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.model.prefix_kv(*args)


def test_prefix_and_velocity_trace_to_static_graphs(dummy: Pi0) -> None:
    """Captured once, the graphs must compute the eager result for other masks and values too:
    nothing in them may depend on the data through Python."""
    images, image_masks, ids, token_mask, state, noise = random_inputs(dummy, 4)
    prefix = torch.export.export(_Prefix(dummy), (images, image_masks, ids, token_mask), strict=False).module()
    velocity_args = (state, noise, torch.ones(1), *dummy.prefix_kv(images, image_masks, ids, token_mask))
    velocity = torch.export.export(_Velocity(dummy), velocity_args, strict=False).module()

    images2, _, ids2, _, state2, noise2 = random_inputs(dummy, 5)
    masks2, token_mask2 = torch.tensor([[True, False, True]]), torch.arange(8)[None] < 3
    for got, want in zip(
        prefix(images2, masks2, ids2, token_mask2), dummy.prefix_kv(images2, masks2, ids2, token_mask2), strict=True
    ):
        torch.testing.assert_close(got, want)
    cache = dummy.prefix_kv(images2, masks2, ids2, token_mask2)
    t = torch.tensor([0.3])
    torch.testing.assert_close(velocity(state2, noise2, t, *cache), dummy.velocity(state2, noise2, t, *cache))
