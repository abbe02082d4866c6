"""Frames a client letterboxed before sending: recognised, undone where the convention is known, else flagged.

openpi's robot clients resize every camera frame to 224x224 with `openpi_client.image_tools.resize_with_pad`
before sending it: the content fitted with its aspect ratio kept, pasted centered on black. A bundle whose
framework letterboxes differently (LeRobot 0.3 pads on the left and top; 0.4 with -1) would then see the
content where its training never put it: openpi's `examples/aloha_sim` against a LeRobot-trained ALOHA
policy fails that way. A frame whose aspect ratio is not its camera's (the trained shape in the bundle) is
checked for exactly that geometry (openpi's arithmetic: `ratio = max(w / W, h / H)`, content `int(h / ratio)
x int(w / ratio)`, `int(pad / 2)` before) with black bars; if found, the content alone goes on, to be
resized and padded as the bundle's conventions say. Any other aspect ratio is served as it is and flagged.
"""

from __future__ import annotations

import numpy as np

from runtime.pipeline.transforms import fitted_size, to_chw

MIN_CONTENT = 8  # pixels: a letterbox around less than this is no camera's frame


def same_aspect(height: int, width: int, trained: tuple[int, int]) -> bool:
    """Whether a height x width frame is the trained shape resized: the same aspect ratio up to one pixel of
    rounding on either side (|H w0 - W h0| <= max(h0, w0))."""
    h0, w0 = trained
    return abs(height * w0 - width * h0) <= max(h0, w0)


def undo_letterbox(image: np.ndarray, trained: tuple[int, int, int]) -> tuple[np.ndarray, str | None]:
    """A camera frame (HxWx3 or 3xHxW) and its camera's trained shape (CHW) -> (the frame to preprocess,
    a note: None where its aspect ratio is the camera's, else what was done)."""
    chw = to_chw(image)
    _, height, width = chw.shape
    h0, w0 = trained[1], trained[2]
    if same_aspect(height, width, (h0, w0)):
        return image, None
    try:
        content_h, content_w = fitted_size(h0, w0, height, width)
    except ValueError:  # the trained shape fits this frame as nothing: no letterbox of it
        content_h = content_w = 0
    if min(content_h, content_w) < MIN_CONTENT:
        return image, f"a {height}x{width} frame for a camera trained at {h0}x{w0}: served as it is"
    top, left = int((height - content_h) / 2), int((width - content_w) / 2)
    bottom, right = top + content_h, left + content_w
    content = chw[:, top:bottom, left:right]
    bars = (chw[:, :top], chw[:, bottom:], chw[:, top:bottom, :left], chw[:, top:bottom, right:])
    if not any(bar.any() for bar in bars):
        note = (
            f"a {height}x{width} frame letterboxed by the client (openpi's resize_with_pad) for a camera trained "
            f"at {h0}x{w0}: its {content_h}x{content_w} content used"
        )
        return content, note
    note = (
        f"a {height}x{width} frame for a camera trained at {h0}x{w0}: another aspect ratio and no letterbox "
        "recognised; served as it is (the scene is not where training put it)"
    )
    return image, note
