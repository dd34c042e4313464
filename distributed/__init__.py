"""Meshes (mesh.py), Megatron tensor parallelism as shardings (tensor_parallel.py) and as a
shard_map layer (tp_layer.py), and GPipe-style pipeline parallelism (pipeline.py); the multi-process
launch and host offload arrive with the rest of their issue. `models/` never imports this package;
the engine does."""
