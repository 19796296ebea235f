"""Prompt templates for zero-shot classification: each holds one `{}` for the class name.

Sets:
  imagenet80: the 80 ImageNet prompts of OpenAI's CLIP paper (prompt ensembling, Sec. 3.1.4).
  openai7: the 7-prompt subset OpenAI found to work about as well as all 80 on ImageNet.
  generic: a short set for drawings and photos alike (the evaluators' default).
  short: the class name as a caption fragment ("{}.", "a {}.", "the {}."), the style of
    captions made of titles and keyword lists (on the demo's held-out proxy it beat `generic`
    for models trained with `data.sentence_dropout`, see configs/clip.py:demo).
  photo: the single prompt "a photo of a {}." (CLIP's baseline prompt).
  name: the bare class name.
"""

from __future__ import annotations

from typing import Sequence

IMAGENET80 = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

OPENAI7 = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

GENERIC = (
    "a photo of a {}.",
    "a drawing of a {}.",
    "an illustration of a {}.",
    "clip art of a {}.",
    "a picture of a {}.",
    "{}.",
)

SHORT = ("{}.", "a {}.", "the {}.")

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "imagenet80": IMAGENET80,
    "openai7": OPENAI7,
    "generic": GENERIC,
    "short": SHORT,
    "photo": ("a photo of a {}.",),
    "name": ("{}",),
}


def get_templates(spec: str | Sequence[str]) -> tuple[str, ...]:
    """A template set by name (`TEMPLATE_SETS`) or an explicit sequence of templates.

    Raises ValueError for an unknown name, an empty list or a template without exactly one `{}`.
    """
    if isinstance(spec, str):
        if spec not in TEMPLATE_SETS:
            raise ValueError(
                f"unknown template set {spec!r}; choose one of "
                f"{sorted(TEMPLATE_SETS)} or give a list of templates with '{{}}'"
            )
        return TEMPLATE_SETS[spec]
    templates = tuple(spec)
    if not templates:
        raise ValueError("the template list is empty")
    for t in templates:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise ValueError(f"template {t!r} must be a string holding exactly one '{{}}'")
    return templates


def format_prompts(classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Prompts in class-major order: `[c0t0, c0t1, ..., c1t0, ...]`, C * T strings."""
    return [t.format(c) for c in classnames for t in templates]
