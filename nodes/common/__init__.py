"""Model parts every family shares: the static sink+window KV cache, RoPE tables, the one attention
entry point (with LSE and the backend choice), context-parallel token sharding, the causal-model
contract that ``ar.sampler`` drives, and the model-node base that loads weights.

Kept import-free so ``import nodes.common`` stays cheap; import the submodules. Nothing here
imports a model family.
"""
