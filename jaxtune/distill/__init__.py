"""Distillation: what the ``distill`` objective needs besides its loss.

The loss is an objective like any other (:mod:`jaxtune.objectives.distill`); this package holds
the pieces around it:

- :mod:`.divergence`: TRL's generalised JSD (forward KL, reverse KL, JSD) with temperature
  and top-k, computed a vocabulary chunk at a time for both models;
- :mod:`.teacher`: finding, checking (family, vocabulary) and loading the frozen teacher on
  the training mesh, outside the train state;
- :mod:`.batches`: the batch source: the data's answers, or on-policy (GKD's ``lmbda``) the
  student's own, or (``seq_kd``) the teacher's;
- :mod:`.topk`: the teacher's top-k log-probs precomputed once and cached with the data.

See ``docs/distillation.md``.
"""
