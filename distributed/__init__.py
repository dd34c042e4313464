"""Meshes (mesh.py), Megatron tensor parallelism as shardings (tensor_parallel.py), as a shard_map
layer (tp_layer.py) and as attention on each device's own heads (head_parallel.py), GPipe-style
pipeline parallelism (pipeline.py), several processes as one jax.distributed program (multihost.py,
launch.py), host offload of weights (offload.py), the collectives of a compiled program
(hlo_comm.py) and a paper-scale memory / communication model (projection.py). `models/` never
imports this package; the engine does."""
