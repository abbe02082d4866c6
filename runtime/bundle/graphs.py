"""The two graphs' contracts: their names and their inputs and outputs, in order. The exporter traces
the graphs with these names and the backends bind them; neither spells them out itself.

    vlm:    images f32 [1, slots, 3, H, W] in [-1, 1], image_masks bool [1, slots],
            tokens i32 [1, L], token_mask bool [1, L]
            -> prefix_keys, prefix_values [depth, 1, P, head_dim] (the weights' dtype), prefix_mask bool [1, P]
    expert: state f32 [1, max_state_dim] (normalized, padded; pi0 only: pi0.5 reads the state from the
            prompt), x_t f32 [1, chunk, max_action_dim], t f32 [1], prefix_keys, prefix_values, prefix_mask
            -> velocity f32 [1, chunk, max_action_dim]

A bundle exported with classifier-free guidance (docs/guidance.md) has one or two more:

    expert_guided: the expert's inputs and `guidance_scale` f32 [1] (after t) -> the guided velocity
            v_u + beta (v_c - v_u) [1, chunk, max_action_dim], both branches one batch of two inside; its
            prefix cache is the VLM's (batch 1: a learned condition) or vlm_guided's (batch 2)
    vlm_guided (a condition in the prompt): the VLM's inputs with tokens and token_mask [2, L] (the
            unconditioned prompt, then the conditioned one; the images once) -> the prefix cache of batch 2
"""

VLM, EXPERT = "vlm", "expert"
VLM_GUIDED, EXPERT_GUIDED = "vlm_guided", "expert_guided"
VLM_GRAPHS = (VLM, VLM_GUIDED)  # those that write a prefix cache; the others read one per step
VLM_INPUTS = ("images", "image_masks", "tokens", "token_mask")
PREFIX_CACHE = ("prefix_keys", "prefix_values", "prefix_mask")
VLM_OUTPUTS = PREFIX_CACHE
STEP_INPUTS = ("state", "x_t", "t")
GUIDANCE_SCALE = "guidance_scale"
EXPERT_INPUTS = (*STEP_INPUTS, *PREFIX_CACHE)
PI05_EXPERT_INPUTS = tuple(name for name in EXPERT_INPUTS if name != "state")
EXPERT_OUTPUTS = ("velocity",)


def expert_inputs(pi05: bool, guided: bool = False) -> tuple[str, ...]:
    names = PI05_EXPERT_INPUTS if pi05 else EXPERT_INPUTS
    if guided:
        at = names.index("t") + 1
        names = (*names[:at], GUIDANCE_SCALE, *names[at:])
    return names
