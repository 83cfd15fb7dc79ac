"""Placement on Ray: the online loop's roles on worker groups (`--placement colocate|split:P,R`).

- `placement.py`  parse `--placement` into policy and rollout pools
- `launch.py`     the driver process: start or join Ray, start the groups, watch them
- `workers.py`    the actors: a policy worker is one torch.distributed rank; a rollout worker
                  hosts an engine (HFEngine, or a vLLM server it starts)
- `ray_rollout.py` the rollout role as the policy ranks see a rollout pool

Ray is an optional extra (`pip install alignkit[ray]`); nothing here imports it at module load.
"""
