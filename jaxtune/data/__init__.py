"""The data pipeline: sources -> formats -> tokens + loss masks -> packed rows -> batches.

Contracts other modules rely on (keep them stable):

``load_tokenizer(cfg: TrainConfig)``
    The ``transformers`` tokenizer from ``cfg.model.tokenizer`` (or ``cfg.model.path``),
    ``trust_remote_code=False``, with ``cfg.data.chat_template`` applied when set.

``make_batch_iterator(cfg, tokenizer, *, split="train", process_index=None, process_count=None)``
    An iterator of host batches for THIS process (defaults: ``jax.process_index()`` /
    ``jax.process_count()``). Each batch is a dict of numpy arrays of shape
    ``[cfg.trainer.global_batch_size // process_count, cfg.data.seq_len]``:

    - ``input_ids`` int32;
    - ``targets`` int32: the next token *within the same document* (the shift is done here, so
      packing can never leak a target across documents);
    - ``loss_mask`` float32: 1.0 where ``targets[t]`` is trained;
    - ``segment_ids`` int32: 0 = padding, documents 1, 2, ... within a row;
    - ``positions`` int32: restart at 0 for each document.

    ``get_state() -> dict`` (JSON-serialisable) and ``set_state(dict)`` restore the exact data
    position. ``split="train"`` is infinite over epochs, reshuffled each epoch from
    ``cfg.run.seed``; ``split="eval"`` makes one deterministic pass over
    ``cfg.data.eval_sources``, padding the last batch with rows whose loss mask is all 0, then
    stops. ``.stats`` holds examples, tokens, trained_tokens, truncated, dropped,
    skipped_bad_rows and packing_efficiency (plus a few more) for logging. Process ``p`` gets
    a disjoint slice of every global batch (rows ``[p * B / P, (p + 1) * B / P)``);
    ``.last_examples`` lists, per local row of the last batch, the ``(source, shard, row)`` of
    each document in it. With ``cfg.data.streaming`` the same interface reads, tokenizes and
    packs on the fly (:mod:`jaxtune.data.streaming`).

``to_global_batch(host_batch, mesh) -> dict[str, jax.Array]``
    Each process's rows placed into global arrays sharded with
    ``jaxtune.sharding.batch_sharding(mesh)`` (``jax.make_array_from_process_local_data``).

``inspect_data(cfg, n=3, color=None)`` (in :mod:`jaxtune.data.inspect`)
    Prints the first examples with the trained tokens marked, plus totals.

Tokenization runs once per data file and is cached under ``cfg.data.cache_dir``, keyed by the
file's content, the tokenizer, its chat template and the format settings.

Modules, in pipeline order: ``sources`` (files, folders, hub ids via ``datasets``), ``formats``
(row -> text pieces or chat), ``chat`` (template rendering and trained spans by prefix diff),
``encode`` (tokens + trained flags), ``cache``, ``prepare`` (documents, truncation, totals),
``packing``, ``loader`` (epochs, shuffling, weights, processes, state), ``streaming``,
``inspect`` (``jaxtune inspect-data``), ``tokenizer`` (loading, template overrides).
"""

from jaxtune.data import loader as _loader
from jaxtune.data import preference as _preference
from jaxtune.data.errors import BadRowError, DataError
from jaxtune.data.loader import BatchIterator, to_global_batch
from jaxtune.data.tokenizer import load_tokenizer


def make_batch_iterator(cfg, tokenizer, *, split: str = "train", process_index: int | None = None,
                        process_count: int | None = None):
    """The batch iterator of this process for ``split`` (see the module docstring): pairs for
    ``data.format: preference`` (:mod:`jaxtune.data.preference`), else token rows."""
    if cfg.data.format == "preference":
        return _preference.make_pair_iterator(cfg, tokenizer, split=split,
                                              process_index=process_index,
                                              process_count=process_count)
    return _loader.make_batch_iterator(cfg, tokenizer, split=split, process_index=process_index,
                                       process_count=process_count)


__all__ = [
    "BadRowError",
    "BatchIterator",
    "DataError",
    "load_tokenizer",
    "make_batch_iterator",
    "to_global_batch",
]
