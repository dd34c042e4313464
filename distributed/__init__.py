"""Meshes and tensor parallelism (pipeline parallelism and the multi-process launch arrive with the
rest of their issue): `make_mesh` (mesh.py), `shard_params` / `runner_placement`
(tensor_parallel.py). `models/` never imports this package; the engine does."""
