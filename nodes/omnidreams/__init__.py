"""OmniDreams: the HD-map-conditioned streaming driving world model (a Cosmos-Predict2.5 DiT with a causal
KV cache). Built on nodes.cosmos; streams through ``ar.sampler`` as a causal model."""
