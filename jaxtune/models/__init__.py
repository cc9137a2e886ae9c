"""Model families, keyed by Hugging Face ``model_type``.

Each family is a sub-package (``llama/``, ...) that registers itself with
:func:`jaxtune.models.family.register_family`; see ``family.py`` for the protocol a family
implements and how families are discovered. ``build.py`` builds any family's model abstractly
or initialised and sharded; ``table.py`` is the HF <-> jaxtune parameter table; ``stack.py``
is the decoder-layer stack (scan, remat, per-layer variants) every family reuses.
"""

from jaxtune.models.build import abstract_model, init_model
from jaxtune.models.family import (
    Family,
    UnknownModelTypeError,
    family_of,
    get_family,
    register_family,
    supported_model_types,
)
from jaxtune.models.table import Rule, Transform

__all__ = ["Family", "Rule", "Transform", "UnknownModelTypeError", "abstract_model",
           "family_of", "get_family", "init_model", "register_family", "supported_model_types"]
