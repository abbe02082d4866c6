"""The two graphs' contracts: their names and their inputs and outputs, in order. The exporter traces
the graphs with these names and the backends bind them; neither spells them out itself.

    vlm:    images f32 [1, slots, 3, H, W] in [-1, 1], image_masks bool [1, slots],
            tokens i32 [1, L], token_mask bool [1, L]
            -> prefix_keys, prefix_values [depth, 1, P, head_dim] (the weights' dtype), prefix_mask bool [1, P]
    expert: state f32 [1, max_state_dim] (normalized, padded), x_t f32 [1, chunk, max_action_dim],
            t f32 [1], prefix_keys, prefix_values, prefix_mask
            -> velocity f32 [1, chunk, max_action_dim]
"""

VLM, EXPERT = "vlm", "expert"
VLM_INPUTS = ("images", "image_masks", "tokens", "token_mask")
PREFIX_CACHE = ("prefix_keys", "prefix_values", "prefix_mask")
VLM_OUTPUTS = PREFIX_CACHE
STEP_INPUTS = ("state", "x_t", "t")
EXPERT_INPUTS = (*STEP_INPUTS, *PREFIX_CACHE)
EXPERT_OUTPUTS = ("velocity",)
GRAPHS = {VLM: (VLM_INPUTS, VLM_OUTPUTS), EXPERT: (EXPERT_INPUTS, EXPERT_OUTPUTS)}
