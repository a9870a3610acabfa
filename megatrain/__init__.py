"""megatrain: distributed long-context pretraining for MEGA language models.

    import megatrain
    ids = megatrain.generate(model, input_ids, max_new_tokens=32, do_sample=False)
"""
__version__ = "0.1.0"


def __getattr__(name):
    # `generate` is imported lazily so `import megatrain` (e.g. for __version__) does not pull in torch
    if name == "generate":
        from megatrain.model.generate import generate

        return generate
    raise AttributeError(f"module 'megatrain' has no attribute {name!r}")


__all__ = ["__version__", "generate"]
