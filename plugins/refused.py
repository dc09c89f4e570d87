"""Diffusers denoisers causalize refuses on purpose, each with the reason read from its forward.

- JoyImageEditTransformer3DModel: an image editor. Its pipeline always passes one latent frame
  (`video_length = 1`); the extra axis of a 6-D input holds the reference images and the target
  (the target is rotated to the front before the rows are concatenated), an unordered set of
  images, not time. Making "frames" causal would only hide the references from the target.
- JoyImageEditPlusTransformer3DModel: the same editor on a padded list of patches
  `(B, max_patches, C, pt, ph, pw)` plus a per-sample `shape_list`; the RoPE "t" index counts the
  images (target, then references), not time. No frame axis in the inputs either.
- MiniMaxH3Transformer3DModel: one packed 1-D sequence (text rows, keyframe-anchor rows, channel
  -major audio rows, target video rows) laid out by the caller through `position_ids`,
  `video_indices`, `audio_indices`, `text_indices` and per-row `timestep_indices`; its inputs carry
  no frame axis (video rows are patches in an order the caller chooses), the text rows sit on the
  same rotary time axis before the media, and a "last" keyframe anchor puts the clip's final
  frame in the sequence as a condition of every row: the future is an input by design.
- Cosmos3OmniTransformer: a mixture of transformers over one unbatched packed sequence built from
  lists (`vision_tokens`, `sound_tokens`, `action_tokens` with sequence / noisy-frame indexes): the
  frame map lives in the caller's packing, not in an input axis; its generation pathway attends
  fully over every generation token (video, sound and action alike) and it already has native
  action modes (action tokens as their own modality), so a frame-level action adapter would
  duplicate them.
"""

from __future__ import annotations

from causalize.hookspecs import hookimpl
from causalize.plan import Refusal

REFUSALS = (
    Refusal(
        model_class="JoyImageEditTransformer3DModel",
        reason=(
            "no frame axis: an image-editing model whose pipeline passes one latent frame (video_length=1); "
            "the item axis of a 6-D input is a set of reference images plus the target, not time"
        ),
        nearest="wan",
    ),
    Refusal(
        model_class="JoyImageEditPlusTransformer3DModel",
        reason=(
            "no frame axis: an image-editing model on a padded packed patch list (B, max_patches, C, pt, ph, pw) "
            "with a per-sample shape_list; its RoPE t index counts images (target, references), not time"
        ),
        nearest="wan",
    ),
    Refusal(
        model_class="MiniMaxH3Transformer3DModel",
        reason=(
            "packed sequence without a frame map: text, keyframe-anchor, audio and video rows are packed into one "
            "1-D sequence by caller-built position_ids / *_indices / timestep_indices; the inputs have no frame "
            "axis, and a 'last' keyframe anchor conditions every row on the clip's final frame"
        ),
        nearest="ltx",
    ),
    Refusal(
        model_class="Cosmos3OmniTransformer",
        reason=(
            "packed multimodal list inputs without a frame axis: vision, sound and action items are packed into one "
            "unbatched sequence by caller-built indexes, the generation pathway attends over all of it, and the "
            "model has native action modes (action tokens) that a frame-level action adapter would duplicate"
        ),
        nearest="cosmos",
    ),
)


@hookimpl
def causalize_register_refusals(register):
    for refusal in REFUSALS:
        register(refusal)
