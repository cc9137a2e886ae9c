"""``data.format: preference``: pairs of a prompt with a chosen and a rejected completion.

Row shapes accepted (field names from ``data.prompt_field``, ``data.chosen_field``,
``data.rejected_field``):

* ``prompt`` a string, ``chosen`` / ``rejected`` strings: plain text, the completion and EOS
  trained (TRL's "standard" preference format);
* ``prompt`` a chat message list, ``chosen`` / ``rejected`` a string or a list of assistant
  messages: rendered with the chat template (TRL's conversational format);
* no ``prompt``: ``chosen`` / ``rejected`` full conversations sharing their first turns (the
  shared turns are the prompt), or full texts with a common prefix (Anthropic HH: the
  prompt is the longest common prefix, backed up to a word boundary).

Each side is encoded exactly like a chat or completion row (:mod:`jaxtune.data.chat` masks by
probe rendering, so only the completion turns and their end-of-turn token are trained; earlier
assistant turns of the prompt are not). The cache stores a pair as two consecutive examples
(chosen, then rejected). Each side gets at most ``data.seq_len`` positions (``data.truncation``
cuts longer ones), so a batch row of pairs has ``2 * seq_len`` positions either way:

* ``data.packing: false``: a row is one pair, as ``chosen_*`` and ``rejected_*`` arrays
  ``[B, seq_len]`` (:data:`PAIR_AXES`);
* ``data.packing: true``: a row of ``2 * seq_len`` positions holds as many whole pairs as fit,
  pair ``k`` of the row as two documents, segment ``2k + 1`` its chosen side and ``2k + 2`` its
  rejected side, in the token batch's keys ``input_ids``, ``targets``, ``loss_mask``,
  ``segment_ids``, ``positions`` (:data:`PACKED_PAIR_AXES`). Segment ids keep attention and the
  per-side log-prob sums inside each document (see :mod:`jaxtune.objectives.preference`).

Either way both sides of a pair sit in the same row, hence the same micro-batch on the same
device. The packer fills rows by the pair's total length (both sides); a pair never splits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from jaxtune.data import cache
from jaxtune.data.encode import Encoder
from jaxtune.data.errors import BadRowError, DataError, RowProblem
from jaxtune.data.formats import ChatExample, FormatSpec, PlainExample, parse_messages
from jaxtune.data.loader import BatchIterator
from jaxtune.data.packing import rows_to_arrays
from jaxtune.data.prepare import Documents, PreparedData, cache_root
from jaxtune.data.sources import resolve_source
from jaxtune.data.tokenizer import TokenizerInfo

log = logging.getLogger(__name__)

SIDES = ("chosen", "rejected")
_ROW_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")
#: The batch of unpacked pairs: per pair row, both sides' token arrays ``[B, seq_len]``.
PAIR_AXES = {f"{side}_{k}": ("batch", "seq") for side in SIDES for k in _ROW_KEYS}
#: The batch of packed pairs: rows ``[B, 2 * seq_len]`` holding whole pairs (module docstring).
PACKED_PAIR_AXES = {k: ("batch", "seq") for k in _ROW_KEYS}
#: Precomputed reference log-probs (``trainer.preference.precompute_reference``): ``[B]`` per
#: pair row, or ``[B, pair_slots(seq_len)]`` per pair slot of a packed row (0 where empty).
REFERENCE_AXES = {"reference_chosen_logps": ("batch",), "reference_rejected_logps": ("batch",)}


def pair_slots(seq_len: int) -> int:
    """The most pairs a packed row of ``2 * seq_len`` positions can hold (each side of a pair
    takes at least one position): the static width of a packed batch's per-pair arrays."""
    return seq_len


@dataclass(frozen=True)
class PreferenceSpec:
    """The fields of a preference row."""

    prompt_field: str = "prompt"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"

    @classmethod
    def from_config(cls, data_cfg) -> PreferenceSpec:
        return cls(data_cfg.prompt_field, getattr(data_cfg, "chosen_field", "chosen"),
                   getattr(data_cfg, "rejected_field", "rejected"))


# --------------------------------------------------------------------------- rows


def parse_pair(row: dict[str, Any], spec: PreferenceSpec, fmt: FormatSpec):
    """``(chosen, rejected, prompt_assistant_turns)``: two examples (plain or chat) and how many
    assistant turns belong to the prompt (their spans are not trained)."""
    for name in (spec.chosen_field, spec.rejected_field):
        if row.get(name) is None:
            have = ", ".join(sorted(k for k, v in row.items() if v is not None)) or "no fields"
            raise RowProblem(name, f"is missing (the row has {have})",
                             "Point data.chosen_field / data.rejected_field at the right fields.")
    chosen, rejected = row[spec.chosen_field], row[spec.rejected_field]
    prompt = row.get(spec.prompt_field)
    if prompt is None:
        if isinstance(chosen, str) and isinstance(rejected, str):
            prompt, chosen, rejected = _split_common_text(chosen, rejected, spec)
        elif isinstance(chosen, list) and isinstance(rejected, list):
            prompt, chosen, rejected = _split_common_turns(chosen, rejected, spec, fmt)
        else:
            raise RowProblem(spec.chosen_field, "and the rejected field must both be strings or "
                             "both message lists when there is no prompt field")
    if isinstance(prompt, str):
        texts = [_completion_text(v, name) for v, name in
                 ((chosen, spec.chosen_field), (rejected, spec.rejected_field))]
        _check_distinct(texts[0], texts[1], spec)
        return (PlainExample([(prompt, False), (texts[0], True)]),
                PlainExample([(prompt, False), (texts[1], True)]), 0)
    if not isinstance(prompt, list):
        raise RowProblem(spec.prompt_field, "must be a string or a list of chat messages, got "
                         f"{type(prompt).__name__}")
    prompt_msgs = parse_messages({spec.prompt_field: prompt}, _messages_spec(fmt, spec.prompt_field,
                                                                            need_assistant=False))
    sides = []
    for value, name in ((chosen, spec.chosen_field), (rejected, spec.rejected_field)):
        sides.append(_completion_turns(value, name, fmt))
    _check_distinct(sides[0], sides[1], spec)
    n_prompt = sum(m["role"] == "assistant" for m in prompt_msgs)
    fields = [f"{spec.prompt_field}[{j}].content" for j in range(len(prompt_msgs))]
    if fmt.system_prompt and prompt_msgs[0]["role"] == "system" and (
            not isinstance(prompt[0], dict) or prompt[0].get("role") != "system"):
        fields = ["data.system_prompt"] + fields[:-1]
    out = []
    for turns, name in zip(sides, (spec.chosen_field, spec.rejected_field), strict=True):
        names = fields + [f"{name}[{j}].content" if len(turns) > 1 or _is_list_field(row, name)
                          else name for j in range(len(turns))]
        out.append(ChatExample(prompt_msgs + turns, names))
    return out[0], out[1], n_prompt


def _is_list_field(row, name) -> bool:
    return isinstance(row.get(name), list)


def _messages_spec(fmt: FormatSpec, field_name: str, need_assistant: bool) -> FormatSpec:
    # parse_messages checks for an assistant turn unless train_on_inputs; the prompt has none.
    return FormatSpec(**{**fmt.__dict__, "messages_field": field_name,
                         "train_on_inputs": not need_assistant})


def _completion_text(value: Any, name: str) -> str:
    if isinstance(value, list):
        raise RowProblem(name, "is a message list but the prompt is a string; give both as "
                         "text or the prompt as messages")
    if not isinstance(value, str):
        raise RowProblem(name, f"must be a string, got {type(value).__name__}")
    if not value.strip():
        raise RowProblem(name, "is an empty completion")
    return value


def _completion_turns(value: Any, name: str, fmt: FormatSpec) -> list[dict[str, Any]]:
    """A completion as assistant messages: a string is one assistant turn."""
    if isinstance(value, str):
        if not value.strip():
            raise RowProblem(name, "is an empty completion")
        return [{"role": "assistant", "content": value}]
    if not isinstance(value, list) or not value:
        raise RowProblem(name, "must be a string or a non-empty list of assistant messages")
    turns = parse_messages({name: value}, _messages_spec(fmt, name, need_assistant=True))
    if fmt.system_prompt and turns[0]["role"] == "system" and value[0].get("role") != "system":
        turns = turns[1:]  # the default system prompt belongs before the prompt, not here
    if turns[-1]["role"] != "assistant":
        raise RowProblem(f"{name}[{len(value) - 1}]", "must be an assistant message (the "
                         "completion ends with the model's reply)")
    if not any(m["content"].strip() for m in turns if m["role"] == "assistant"):
        raise RowProblem(name, "is an empty completion")
    return turns


def _check_distinct(chosen, rejected, spec: PreferenceSpec) -> None:
    if chosen == rejected:
        raise RowProblem(spec.rejected_field, "is identical to the chosen completion, so the "
                         "pair says nothing", "Remove the row or fix the rejected side.")


def _split_common_text(chosen: str, rejected: str, spec: PreferenceSpec):
    """Anthropic-HH rows: the prompt is the common prefix, ending at a word boundary."""
    n = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        n += 1
    if n == len(chosen) == len(rejected):
        raise RowProblem(spec.rejected_field, "is identical to the chosen text")
    while n > 0 and not chosen[n - 1].isspace() and chosen[n - 1] not in ":.?!":
        n -= 1  # do not split a word the two completions happen to share
    while n > 0 and chosen[n - 1] == " ":
        n -= 1  # the space before the reply belongs to the reply's first token
    return chosen[:n], chosen[n:], rejected[n:]


def _split_common_turns(chosen: list, rejected: list, spec: PreferenceSpec, fmt: FormatSpec):
    """TRL conversational rows without a prompt: the shared first turns are the prompt."""
    n = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        n += 1
    if n == len(chosen) == len(rejected):
        raise RowProblem(spec.rejected_field, "is identical to the chosen conversation")
    if n == 0:
        raise RowProblem(spec.chosen_field, "and the rejected conversation share no prompt "
                         "turns; give the prompt in data.prompt_field")
    return chosen[:n], chosen[n:], rejected[n:]


# --------------------------------------------------------------------------- encoding


class PreferenceEncoder:
    """Encodes preference rows: per row, two ``(tokens, trained)`` (chosen, rejected)."""

    def __init__(self, tokenizer, fmt: FormatSpec, spec: PreferenceSpec,
                 info: TokenizerInfo | None = None):
        self.encoder = Encoder(tokenizer, fmt, info)
        self.fmt, self.spec = fmt, spec

    @property
    def turns_without_end(self) -> int:
        return self.encoder.turns_without_end

    def render_pair(self, row: dict[str, Any]):
        chosen, rejected, n_prompt = parse_pair(row, self.spec, self.fmt)
        out = []
        for example in (chosen, rejected):
            if isinstance(example, ChatExample) and not self.encoder.info.has_chat_template:
                raise DataError(
                    "data.format preference has conversational rows, but the tokenizer has no "
                    "chat template. Set data.chat_template (chatml, llama3, gemma, gemma4, a file "
                    "or Jinja).")
            r = self.encoder.render_example(example)
            r.spans = r.spans[n_prompt:]  # the prompt's own assistant turns are not trained
            out.append(r)
        return out

    def encode_batch(self, rows, on_problem):
        rendered: list = []
        for i, row in enumerate(rows):
            try:
                pair = self.render_pair(row)
                self.encoder.turns_without_end += sum(r.turns_without_end for r in pair)
                rendered += pair
            except RowProblem as p:
                on_problem(i, p)
                rendered += [None, None]
        enc = self.encoder.tokenize_rendered(rendered)
        out = []
        for k in range(len(rows)):
            c, r = enc[2 * k], enc[2 * k + 1]
            if c is not None and r is not None:
                if len(c[0]) == len(r[0]) and np.array_equal(c[0], r[0]):
                    on_problem(k, RowProblem(self.spec.rejected_field, "tokenizes exactly like "
                                             "the chosen completion"))
                    out.append(None)
                    continue
            out.append(None if c is None else (c, r))
        return out


def tokenize_pair_shard(shard, encoder: PreferenceEncoder, on_bad_row: str,
                        hf_cache: str | None = None) -> cache.TokenizedShard:
    """Like :func:`jaxtune.data.prepare.tokenize_shard`, storing each pair as two examples."""
    import time

    t0 = time.perf_counter()
    ds = shard.load(hf_cache)
    tokens, trained, lengths, rows, bad = [], [], [], [], []
    encoder.encoder.turns_without_end = 0
    n = 0

    def on_problem(i: int, p: RowProblem) -> None:
        err = BadRowError(f"{shard.name}, row {base + i}", p.field, p.problem, p.fix)
        if on_bad_row == "error":
            raise err
        bad.append(f"{err.where}: field '{err.field}' {err.problem}")

    for batch in ds.iter(batch_size=256):
        cols = list(batch)
        count = len(batch[cols[0]]) if cols else 0
        batch_rows = [{c: batch[c][j] for c in cols} for j in range(count)]
        base = n
        for j, pair in enumerate(encoder.encode_batch(batch_rows, on_problem)):
            if pair is None:
                continue
            for tok, flags in pair:
                tokens.append(tok)
                trained.append(flags)
                lengths.append(len(tok))
                rows.append(base + j)
        n += count
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    meta = {"name": shard.name, "rows": n, "bad_rows": len(bad), "first_bad_rows": bad[:5],
            "turns_without_end": encoder.turns_without_end, "pairs": True,
            "seconds": round(time.perf_counter() - t0, 3)}
    return cache.TokenizedShard(
        tokens=np.concatenate(tokens) if tokens else np.zeros(0, np.int32),
        trained=np.concatenate(trained) if trained else np.zeros(0, np.uint8),
        offsets=offsets, rows=np.asarray(rows, np.int64), meta=meta)


# --------------------------------------------------------------------------- documents


@dataclass
class Pairs:
    """Per pair document: where each side's tokens are (parallel to ``Documents``)."""

    chosen_start: np.ndarray
    chosen_length: np.ndarray
    rejected_start: np.ndarray
    rejected_length: np.ndarray


@dataclass
class PreferenceData(PreparedData):
    """Prepared pairs: ``docs`` has one entry per pair (``start`` of the chosen side; ``length``
    ``- 1`` the positions both sides take, which the packer fills rows with), ``pairs`` both
    sides' spans."""

    pairs: Pairs | None = None


def prepare_pairs(cfg, tokenizer, split: str = "train") -> PreferenceData:
    """Tokenize (or load from cache) the preference sources of ``cfg`` into pairs."""
    sources = cfg.data.sources if split == "train" else cfg.data.eval_sources
    list_key = "data.sources" if split == "train" else "data.eval_sources"
    if split == "train" and not sources:
        raise DataError("No training data: add at least one entry to data.sources.")
    if cfg.data.truncation == "split":
        raise DataError("data.truncation: split does not suit preference pairs; use truncate, "
                        "drop or error.")
    info = TokenizerInfo.of(tokenizer)
    fmt = FormatSpec.from_config(cfg.data)
    spec = PreferenceSpec.from_config(cfg.data)
    encoder = PreferenceEncoder(tokenizer, fmt, spec, info)
    root = cache_root(cfg.data)
    hf_cache = f"{root}/hf"
    fmt_key = {"spec": fmt.__dict__, "pairs": spec.__dict__, "on_bad_row": cfg.data.on_bad_row}
    shards, tokenized, keys = [], [], []
    for i, src in enumerate(sources):
        for shard in resolve_source(i, src, list_key):
            key = cache.cache_key({"shard": shard.identity(hf_cache),
                                   "tokenizer": info.fingerprint, "format": fmt_key})
            tok = cache.load(root, key)
            if tok is None:
                tok = tokenize_pair_shard(shard, encoder, cfg.data.on_bad_row, hf_cache)
                cache.save(root, key, tok)
            shards.append(shard)
            tokenized.append(tok)
            keys.append(key)
    docs, pairs, stats = _pair_documents(shards, tokenized, cfg.data.seq_len,
                                         cfg.data.truncation)
    key = cache.cache_key({"shards": keys, "seq_len": cfg.data.seq_len,
                           "truncation": cfg.data.truncation, "split": split, "pairs": True})
    return PreferenceData(shards, tokenized, docs, [s.weight for s in sources], stats, key,
                          info.pad_id, pairs=pairs)


def _pair_documents(shards, tokenized, seq_len: int, policy: str):
    cols: dict[str, list] = {k: [] for k in ("shard", "start", "length", "source", "row",
                                             "trained", "cs", "cl", "rs", "rl")}
    truncated = dropped = untrained = 0
    for s, (shard, tok) in enumerate(zip(shards, tokenized, strict=True)):
        offsets = np.asarray(tok.offsets)
        flags = np.concatenate([[0], np.cumsum(np.asarray(tok.trained, np.int64))])
        rows = np.asarray(tok.rows)
        for p in range(len(rows) // 2):
            starts = offsets[2 * p:2 * p + 2]
            lengths = offsets[2 * p + 1:2 * p + 3] - starts
            if (lengths > seq_len + 1).any():
                if policy == "error":
                    side = SIDES[int(np.argmax(lengths > seq_len + 1))]
                    raise DataError(
                        f"{shard.name}, row {int(rows[2 * p])}: the {side} side has "
                        f"{int(lengths.max())} tokens, more than data.seq_len + 1 = "
                        f"{seq_len + 1}. Raise data.seq_len or set data.truncation to truncate "
                        "or drop.")
                if policy == "drop":
                    dropped += 1
                    continue
                truncated += 1
                lengths = np.minimum(lengths, seq_len + 1)
            trained = flags[starts + lengths] - flags[starts + 1]
            if (lengths < 2).any() or (trained == 0).any():
                untrained += 1  # a side lost its whole completion to truncation
                continue
            for k, v in (("shard", s), ("start", starts[0]), ("length", lengths.sum() - 1),
                         ("source", shard.source_index), ("row", rows[2 * p]),
                         ("trained", trained.sum()), ("cs", starts[0]), ("cl", lengths[0]),
                         ("rs", starts[1]), ("rl", lengths[1])):
                cols[k].append(int(v))
    arr = {k: np.asarray(v, np.int64) for k, v in cols.items()}
    docs = Documents(shard=arr["shard"].astype(np.int32), start=arr["start"],
                     length=arr["length"], source=arr["source"].astype(np.int32),
                     row=arr["row"], trained=arr["trained"])
    pairs = Pairs(arr["cs"], arr["cl"], arr["rs"], arr["rl"])
    stats = {
        "examples": len(docs), "documents": len(docs), "pairs": len(docs),
        "tokens": int((arr["cl"] - 1).sum() + (arr["rl"] - 1).sum()),
        "trained_tokens": int(arr["trained"].sum()),
        "truncated": truncated, "dropped": dropped + untrained, "dropped_too_long": dropped,
        "dropped_untrained": untrained,
        "skipped_bad_rows": sum(t.meta["bad_rows"] for t in tokenized),
        "turns_without_end": sum(t.meta["turns_without_end"] for t in tokenized),
        "rows_read": sum(t.meta["rows"] for t in tokenized),
    }
    return docs, pairs, stats


def pair_tokens(data: PreferenceData, d: int, side: str) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens, trained)`` of one side of pair document ``d``."""
    tok = data.tokenized[int(data.docs.shard[d])]
    pairs = data.pairs
    start = int((pairs.chosen_start if side == "chosen" else pairs.rejected_start)[d])
    length = int((pairs.chosen_length if side == "chosen" else pairs.rejected_length)[d])
    return tok.tokens[start:start + length], tok.trained[start:start + length]


# --------------------------------------------------------------------------- batches


class PreferenceBatchIterator(BatchIterator):
    """Host batches of pairs, one pair per row (``chosen_*`` / ``rejected_*`` arrays
    ``[B / P, seq_len]``) or, with ``packing``, whole pairs packed into rows of ``2 * seq_len``
    positions (the token batch's keys, see the module docstring), plus ``reference_*_logps``
    when precomputed. Same epochs, shuffling, weights, process slices and resume state as
    :class:`BatchIterator` (whose packer fills the rows by each pair's two sides together)."""

    def __init__(self, data: PreferenceData, *, seq_len: int, packing: bool = False,
                 reference_logps: np.ndarray | None = None, **kwargs):
        super().__init__(data, seq_len=seq_len, packing=packing, row_len=2 * seq_len, **kwargs)
        #: ``[pairs, 2]`` float32 reference log-probs (chosen, rejected), or None
        self.reference_logps = reference_logps
        #: per local row of the last batch: its pair documents (indices into ``data.docs``)
        self.last_pairs: list[list[int]] = []

    def __next__(self) -> dict[str, np.ndarray]:
        rows, epoch, row = self._global_rows(self.epoch, self.row)
        if rows is None:
            raise StopIteration
        lo = self.process_index * self.local_batch_size
        mine = rows[lo:lo + self.local_batch_size]
        self.epoch, self.row = epoch, row
        self.batches += 1
        docs = self.data.docs
        self.last_pairs = mine
        self.last_examples = [
            [(int(docs.source[d]), int(docs.shard[d]), int(docs.row[d])) for d in r] for r in mine
        ]
        return pair_batch(self.data, mine, self.seq_len, self.pad_id, self.reference_logps,
                          packed=self.packing)


def pair_batch(data: PreferenceData, rows: list[list[int]], seq_len: int, pad_id: int,
               reference_logps: np.ndarray | None = None, *,
               packed: bool = False) -> dict[str, np.ndarray]:
    """Arrays for rows given as lists of pair documents (``[]`` is a padding row).

    Unpacked (at most one pair per row): ``chosen_*`` and ``rejected_*`` ``[len(rows),
    seq_len]``, and reference log-probs ``[len(rows)]``. Packed: the token batch's keys
    ``[len(rows), 2 * seq_len]`` with pair ``k`` of a row as segments ``2k + 1`` (chosen) and
    ``2k + 2`` (rejected), and reference log-probs ``[len(rows), pair_slots(seq_len)]``.
    """
    out: dict[str, np.ndarray] = {}
    if packed:
        docs = [[pair_tokens(data, d, side) for d in r for side in SIDES] for r in rows]
        out.update(rows_to_arrays(docs, 2 * seq_len, pad_id))
        slots = pair_slots(seq_len)
    else:
        if any(len(r) > 1 for r in rows):
            raise ValueError("an unpacked batch of pairs holds one pair per row")
        for side in SIDES:
            docs = [[pair_tokens(data, d, side) for d in r] for r in rows]
            for k, v in rows_to_arrays(docs, seq_len, pad_id).items():
                out[f"{side}_{k}"] = v
        slots = 1
    if reference_logps is not None:
        ref = np.zeros((len(rows), slots, 2), np.float32)
        for i, r in enumerate(rows):
            if r:
                ref[i, :len(r)] = reference_logps[r]
        if not packed:
            ref = ref[:, 0]
        out["reference_chosen_logps"] = ref[..., 0].copy()
        out["reference_rejected_logps"] = ref[..., 1].copy()
    return out


def reference_identity(cfg) -> dict[str, Any]:
    """What the reference log-probs depend on besides the data: the starting model (its
    folder, weight files' names, sizes and modification times, dtypes, overrides) and the
    base a LoRA run keeps."""
    import os

    path = cfg.model.path
    files = []
    if os.path.isdir(path):
        for name in sorted(os.listdir(path)):
            if name.endswith((".safetensors", ".json", ".bin")):
                st = os.stat(os.path.join(path, name))
                files.append((name, st.st_size, int(st.st_mtime)))
    m = cfg.model
    return {"path": os.path.abspath(path) if os.path.isdir(path) else path, "files": files,
            "dtype": m.dtype, "compute_dtype": m.compute_dtype, "overrides": m.overrides,
            "lora": [cfg.lora.rank > 0, cfg.lora.base_dtype, cfg.lora.quantize_base],
            "chunk": cfg.trainer.loss_chunk_size}


def reference_cache_path(cfg, data: PreferenceData) -> str:
    """Where the precomputed reference log-probs of ``data`` live, beside the tokens."""
    key = cache.cache_key({"data": data.key, "reference": reference_identity(cfg)})
    return f"{cache_root(cfg.data)}/reference-{key}.npy"


def make_pair_iterator(cfg, tokenizer, *, split: str, process_index: int | None = None,
                       process_count: int | None = None,
                       reference_logps: np.ndarray | None = None) -> PreferenceBatchIterator:
    """The preference batch iterator of this process for ``split``. With
    ``trainer.preference.precompute_reference`` it adds the cached reference log-probs (see
    :func:`jaxtune.objectives.preference.precompute_reference_logps`, run by the trainer first)."""
    if split not in ("train", "eval"):
        raise DataError(f"split must be 'train' or 'eval', got '{split}'.")
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if cfg.data.streaming:
        raise DataError("data.format preference does not stream; set data.streaming: false.")
    data = prepare_pairs(cfg, tokenizer, split)
    pref = getattr(cfg.trainer, "preference", None)
    if reference_logps is None and pref is not None and pref.precompute_reference \
            and cfg.trainer.objective in ("dpo",):
        path = reference_cache_path(cfg, data)
        try:
            reference_logps = np.load(path, allow_pickle=False)
        except OSError:
            raise DataError(
                f"The reference log-probs for this data and model are not precomputed ({path} "
                "is missing); 'jaxtune train' computes them before training.") from None
    return PreferenceBatchIterator(
        data, seq_len=cfg.data.seq_len, global_batch_size=cfg.trainer.global_batch_size,
        process_index=process_index, process_count=process_count, seed=cfg.run.seed,
        shuffle=cfg.data.shuffle and split == "train", train=split == "train",
        packing=cfg.data.packing, pad_id=data.pad_id, reference_logps=reference_logps)

