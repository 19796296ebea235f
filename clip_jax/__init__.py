"""clip_jax: train and evaluate CLIP models with JAX/Flax.

The library is usable without the trainer:

    from clip_jax import models, losses, tokenizers
    model = models.create_model("ViT-B-32", dtype="bfloat16")
    variables = model.init_variables(jax.random.key(0))
    out = model.apply(variables, images, tokens)        # normalised embeddings + logit_scale
    loss, metrics = losses.clip_loss(out["image_embeddings"], out["text_embeddings"],
                                     out["logit_scale"], mesh=mesh)

    model = clip_jax.load("runs/tiny")                  # a trained or converted checkpoint

Submodules are imported lazily so that `import clip_jax` stays cheap.
"""

import importlib

# The one place the version is written: setup.cfg reads it (`version = attr:`, statically, no
# import at build time) and installed code reads it as `clip_jax.__version__`.
__version__ = "0.1.0"

_SUBMODULES = (
    "checkpoint",
    "convert",
    "data",
    "evaluation",
    "losses",
    "metrics",
    "models",
    "optim",
    "sharding",
    "step",
    "tokenizers",
)


def __getattr__(name):
    if name in _SUBMODULES:
        module = importlib.import_module(f"clip_jax.{name}")
        globals()[name] = module
        return module
    if name == "load":
        from clip_jax.inference import load

        globals()["load"] = load
        return load
    raise AttributeError(f"module 'clip_jax' has no attribute {name!r}")


__all__ = ["load", "__version__", *_SUBMODULES]
