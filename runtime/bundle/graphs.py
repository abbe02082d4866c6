"""The two graphs' contracts: their names and their inputs and outputs, in order. The exporter traces
the graphs with these names and the backends bind them; neither spells them out itself.

    vlm:    images f32 [1, slots, 3, H, W] in [-1, 1], image_masks bool [1, slots],
            tokens i32 [1, L], token_mask bool [1, L]
            -> prefix_keys, prefix_values [depth, 1, P, head_dim] (the weights' dtype), prefix_mask bool [1, P]
    expert: state f32 [1, max_state_dim] (normalized, padded; pi0 only: pi0.5 reads the state from the
            prompt), x_t f32 [1, chunk, max_action_dim], t f32 [1], prefix_keys, prefix_values, prefix_mask
            -> velocity f32 [1, chunk, max_action_dim]
"""

VLM, EXPERT = "vlm", "expert"
VLM_INPUTS = ("images", "image_masks", "tokens", "token_mask")
PREFIX_CACHE = ("prefix_keys", "prefix_values", "prefix_mask")
VLM_OUTPUTS = PREFIX_CACHE
STEP_INPUTS = ("state", "x_t", "t")
EXPERT_INPUTS = (*STEP_INPUTS, *PREFIX_CACHE)
PI05_EXPERT_INPUTS = tuple(name for name in EXPERT_INPUTS if name != "state")
EXPERT_OUTPUTS = ("velocity",)


def expert_inputs(pi05: bool) -> tuple[str, ...]:
    return PI05_EXPERT_INPUTS if pi05 else EXPERT_INPUTS
