"""Reinforcement learning from rewards: what RL needs besides its loss.

The loss is an objective like any other (``jaxtune.objectives.grpo``); this package holds the
pieces that are not a loss, beside the producer that uses them:

- :mod:`.producer`: the rollout producer, RL's batch source (prompts, generation with the
  current parameters on the training mesh, rewards, advantages, a batch), and the held-out
  evaluation by rewards;
- :mod:`.rewards`: reward functions (TRL's signature), the built-ins, safe calling;
- :mod:`.advantages`: TRL's group-relative advantages, DAPO's informative groups;
- :mod:`.rollout`: completions cut at their stop id and laid out as training rows;
- :mod:`.sampler`: completions from a model on the training mesh (the generator over the
  arrays it is given), shared with distillation's producer (``jaxtune.distill.batches``).

See ``docs/rl.md``.
"""
