"""The Megalodon family (Ma et al. 2024, arXiv 2404.08801): config, complex EMA, timestep norm, normalized
attention, blocks, backbone, causal LM. The names are re-exported by megatrain.model."""
