"""The MEGA family (Ma et al. 2022, arXiv 2209.10655): config, damped EMA, gated attention, blocks, backbone, LMs,
downstream heads. The names are re-exported by megatrain.model."""
