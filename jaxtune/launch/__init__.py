"""``jaxtune launch``: start a training run on cloud machines with one command.

``jaxtune launch tpu CONFIG ...`` creates a Cloud TPU slice, installs jaxtune on every worker,
runs ``jaxtune train`` on all of them at once, streams worker 0's log and deletes the slice
(see :mod:`jaxtune.launch.tpu` and docs/tpu-pods.md). GPU clusters under SLURM need no
launcher: ``scripts/slurm/jaxtune.sbatch`` runs the same ``jaxtune train`` on every node
(docs/gpu-clusters.md).
"""

from __future__ import annotations

import sys

TARGETS = {
    "tpu": "create a Cloud TPU slice, train on all its workers, stream the log, delete it",
}


def launch_main(argv: list[str]) -> int:
    """Entry point of ``jaxtune launch TARGET ...``."""
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: jaxtune launch <target> [args]\n\ntargets:")
        for name, help_ in TARGETS.items():
            print(f"  {name:<6}{help_}")
        print("\nSLURM GPU clusters: sbatch scripts/slurm/jaxtune.sbatch (docs/gpu-clusters.md).")
        return 0
    target, rest = argv[0], argv[1:]
    if target == "tpu":
        from jaxtune.launch.tpu import main

        return main(rest)
    print(f"error: unknown launch target '{target}'; available: {', '.join(TARGETS)}. "
          "For SLURM use scripts/slurm/jaxtune.sbatch.", file=sys.stderr)
    return 2
