"""The online loop (PPO, GRPO, Dr. GRPO, DAPO, RLOO, ReMax, REINFORCE++, online DPO):

- `loop.py`      the driver, `run_online`: steps 1-7 of every training step, one role call each
- `build.py`     `build_online_roles(config)`: models, reference, reward, critic, trainer
- `roles.py`     the role interfaces and their in-process implementations; `SequenceBatch`
- `trainer.py`   `PolicyTrainer`, the policy role: step 6 (epochs x minibatches, optimizer)
- `steps.py`     the tensor maths of a step: reward shaping, advantages, minibatch losses
- `sampling.py`  steps 1-2 (prompt stream, generate, score) and DAPO's dynamic sampling
- `presets.py`   the algorithms as settings of this one loop
- `kl_control.py` the KL coefficient controller and running reward statistics
- `validation.py` --eval-data: held-out prompts sampled and scored while training (eval/*)
"""
