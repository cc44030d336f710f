"""stagejax's device runtime, and the layer of stagejax that needs no JAX.

Reading stage shards (`manifest`, `weight_store`, the GIL-free C reader `native_stream`,
`coalesce`), measuring the process (`measure`), atomic result files (`results`) — shared with
the JAX side, which imports them from here — and running an exported plan with IREE
(`bundle`, `runner`, `cli`). Nothing here imports jax, flax, orbax, hydra or wandb (design §9).
"""
