"""The ``jaxtune`` model of lm-evaluation-harness: a :class:`TemplateLM` over a jaxtune model.

Usable from lm_eval's own Python API once this module is imported::

    import jaxtune.evaluation  # registers "jaxtune"
    import lm_eval
    lm_eval.simple_evaluate(model="jaxtune", model_args="pretrained=runs/quickstart",
                            tasks=["nimbrel_support_mc"])

``pretrained`` is a model folder, an export, a cached hub id or a run directory (its latest
checkpoint or ``step=N``; LoRA adapters applied unmerged). Tokenisation, truncation, the
empty-context prefix token, rolling windows, stop strings and the chat template follow
lm_eval's ``hf`` backend, so the same requests get the same numbers. What differs is how the
model runs: log-likelihood requests are packed several to a row (segment ids keep them apart)
and scored by one forward pass per batch (``jaxtune.evaluation.packing`` / ``scoring``), and
generation runs on jaxtune's KV-cache generator, batched (``jaxtune.evaluation.generation``).
``batch_size`` is rows per forward pass for log-likelihoods (each row holds as many requests
as fit) and prompts per batch for generation.
"""

from __future__ import annotations

import logging
from typing import Any

import jinja2
import lm_eval.models  # noqa: F401 -- lm_eval's lazy model table, before registering ours
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    Collator,
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from jaxtune.evaluation.errors import EvalError
from jaxtune.evaluation.packing import MIN_ROW, Request, pack, pack_shared, split_shared

log = logging.getLogger("jaxtune")

DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_LENGTH = 2048  # lm_eval's when neither config nor tokenizer says
_TOKENIZER_INFINITY = 1000000000000000019884624838656
#: Generation settings lm_eval tasks may pass that change nothing at these values.
_NEUTRAL = {"num_beams": 1, "repetition_penalty": 1.0, "length_penalty": 1.0,
            "no_repeat_ngram_size": 0, "num_return_sequences": 1, "use_cache": True}


def model_max_length(config: Any, tokenizer: Any) -> int:
    """lm_eval's ``resolve_max_length``: the config's context length, else the tokenizer's."""
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if value is not None:
            return int(value)
    value = getattr(tokenizer, "model_max_length", None)
    if value is not None and value != _TOKENIZER_INFINITY:
        return int(value)
    return DEFAULT_MAX_LENGTH


@register_model("jaxtune")
class JaxtuneLM(TemplateLM):
    """lm_eval's view of a jaxtune model. Build it from a path (``pretrained=``) or from a
    ready :class:`~jaxtune.evaluation.engine.Engine` (the command and the training hook do,
    with a :class:`~jaxtune.evaluation.follow.Leader` that runs each call on every host)."""

    def __init__(self, pretrained: str | None = None, *, engine: Any = None,
                 leader: Any = None, step: int | None = None, dtype: str = "float32",
                 batch_size: int | str | None = DEFAULT_BATCH_SIZE, max_length: int | None = None,
                 max_gen_toks: int = 256, min_row: int = MIN_ROW,
                 add_bos_token: bool | None = None, prefix_token_id: int | None = None,
                 stop_ids: list[int] | None = None, seed: int = 1234,
                 chat_template_args: dict[str, Any] | None = None,
                 share_contexts: bool = True, description: str | None = None,
                 **unused: Any):
        super().__init__()
        from jaxtune.evaluation.engine import Engine
        from jaxtune.evaluation.follow import Leader
        from jaxtune.generation.api import default_stop_ids

        ignored = {k: v for k, v in unused.items()
                   if v is not None and k not in ("device", "max_batch_size")}
        if ignored:
            raise EvalError(f"the jaxtune lm_eval model takes no {', '.join(ignored)} "
                            "(see jaxtune/evaluation/lm.py JaxtuneLM for its arguments).")
        generation_config = None
        if engine is None:
            if pretrained is None:
                raise EvalError("the jaxtune lm_eval model needs pretrained=PATH (a model "
                                "folder, export or run directory) or an engine.")
            import jax

            if jax.process_count() > 1:  # the others would never see process 0's requests
                raise EvalError("with several processes, run `jaxtune eval` on every one "
                                "(process 0 drives lm_eval, the others follow); "
                                "model='jaxtune' in lm_eval's own API is for one process.")
            from jaxtune.generation.source import load

            loaded = load(str(pretrained), step=None if step is None else int(step),
                          dtype=dtype)
            engine = Engine(loaded.model, loaded.tokenizer)
            generation_config = loaded.generation_config
            description = description or loaded.description
        self.engine = engine
        self.leader = leader or Leader(engine)
        self.tokenizer = engine.tokenizer
        self.description = description or "jaxtune model"
        if str(batch_size).startswith("auto") or batch_size is None:
            batch_size = DEFAULT_BATCH_SIZE
        self._batch_size = int(batch_size)
        if self._batch_size < 1:
            raise EvalError(f"batch_size={batch_size} must be at least 1.")
        self._max_length = int(max_length) if max_length else model_max_length(
            engine.config, self.tokenizer)
        self._max_gen_toks = int(max_gen_toks)
        self.min_row = int(min_row)
        self.share_contexts = share_contexts not in (False, "False", "false", 0)
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self.stop_ids = list(stop_ids) if stop_ids is not None else default_stop_ids(
            self.tokenizer, generation_config)
        self.seed = int(seed)
        self.chat_template_args = chat_template_args or {}
        self._generate_calls = 0

    # ------------------------------------------------------------ what lm_eval asks

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """The token that stands for an empty context (BOS, else EOS), as in the hf backend."""
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "tokenizer")).replace("/", "__")

    def get_model_info(self) -> dict[str, Any]:
        return {"model": self.description}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   left_truncate_len: int | None = None, **kwargs: Any) -> list[int]:
        """The hf backend's encoding: the tokenizer's own special tokens (``add_bos_token``
        overrides), none when the text already starts with the prefix token."""
        options = {}
        if add_special_tokens is not None:
            options["add_special_tokens"] = add_special_tokens
        elif self.add_bos_token is not None:
            options["add_special_tokens"] = self.add_bos_token
        if add_special_tokens is None and has_bos_prefix(
                string, self.tokenizer.decode(self.prefix_token_id)):
            options["add_special_tokens"] = False
        ids = self.tokenizer.encode(string, **options)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def _prompt_ids(self, context: str, left_truncate_len: int) -> list[int]:
        """A generation prompt as the hf backend's batch encoding makes it (BOS decided by
        the tokenizer's BOS string), cut from the left to leave room for the answer."""
        options = {}
        if has_bos_prefix(context, getattr(self.tokenizer, "bos_token", None)):
            options["add_special_tokens"] = False
        elif self.add_bos_token is not None:
            options["add_special_tokens"] = self.add_bos_token
        ids = self.tokenizer(context, **options)["input_ids"]
        return ids[-left_truncate_len:]

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        """The tokenizer's chat template over the history (a system message dropped when the
        template refuses one), as the hf backend renders it."""
        def render(history):
            return self.tokenizer.apply_chat_template(
                history, tokenize=False, add_generation_prompt=add_generation_prompt,
                continue_final_message=not add_generation_prompt, **self.chat_template_args)

        try:
            return render(chat_history)
        except jinja2.exceptions.TemplateError:
            log.warning("the chat template failed; trying again without the system message")
            return render([m for m in chat_history if m["role"] != "system"])

    # ------------------------------------------------------------ log-likelihoods

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """``(summed log-prob, all greedy)`` per ``(key, context ids, continuation ids)``."""
        packed = [Request.from_tokens(ctx, cont, self.max_length) for _, ctx, cont in requests]
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        # disable=None: no bar where stderr is not a terminal (a log gets no redrawn lines).
        bar = tqdm(total=len(requests), disable=disable_tqdm or None,
                   desc="loglikelihood (jaxtune)")
        # Requests that share a context (multiple choice) run it once; the rest are packed.
        groups, rest = split_shared(packed) if self.share_contexts and \
            self.engine.shares_contexts else ({}, list(range(len(packed))))
        work = [("score_shared", b) for b in pack_shared(
            packed, groups, self.batch_size, row_multiple=self.engine.row_multiple)]
        if rest:
            alone = [packed[i] for i in rest]
            for batch in pack(alone, self.batch_size, min_len=self.min_row,
                              row_multiple=self.engine.row_multiple):
                for p in batch.placements:
                    p.request = rest[p.request]
                work.append(("score", batch))
        for operation, batch in work:
            logp, greedy = self.leader.call(operation, batch.arrays())
            for i, value, is_greedy in batch.read(logp, greedy):
                out[i] = (value, is_greedy)
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])
            bar.update(len(batch.placements))
        bar.close()
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Perplexity: each document's log-likelihood over disjoint windows of at most
        ``max_length`` tokens (each window sees one token of context), as the hf backend."""
        windows, owners = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owners, scores, strict=True):
            totals[i] += logp
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------ generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Answers until a stop string (the task's ``until`` and EOS), at most
        ``max_gen_toks`` tokens, greedy or sampled as the task asks; batched by settings."""
        from jaxtune.evaluation.generation import GenerationRequest

        bar = tqdm(total=len(requests), disable=disable_tqdm or None,
                   desc="generate_until (jaxtune)")
        collator = Collator([req.args for req in requests],
                            sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
                            group_by="gen_kwargs", group_fn=lambda r: r[1])
        eos = self.tokenizer.decode(self.eot_token_id, skip_special_tokens=False)
        results = []
        for chunk in collator.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk, strict=True)
            options = normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks)
            until = handle_stop_sequences(options.pop("until", None), eos=eos)
            max_gen_toks = int(options.pop("max_gen_toks"))
            room = self.max_length - max_gen_toks
            if room <= 0:
                raise EvalError(f"max_gen_toks={max_gen_toks} leaves no room for the prompt "
                                f"in the model's maximum length {self.max_length}.")
            prompts = [self._prompt_ids(c, room) for c in contexts]
            if any(not p for p in prompts):
                raise EvalError("a generation prompt encodes to no tokens; the task's "
                                "doc_to_text gave an empty context.")
            request = GenerationRequest(tuple(map(tuple, prompts)), max_gen_toks,
                                        self._sampling(options), self.seed + self._generate_calls,
                                        tuple(self.stop_ids), tuple(until))
            self._generate_calls += 1
            tokens = self.leader.call("generate", request)
            for context, kwargs, ids in zip(contexts, all_kwargs, tokens, strict=True):
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                text = postprocess_generated_text(text, until, None)
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, kwargs), text)
                bar.update(1)
        bar.close()
        return collator.get_original(results)

    def _sampling(self, options: dict[str, Any]):
        """Greedy, or sampled with the task's temperature / top_k / top_p."""
        from jaxtune.generation.sampling import Sampling

        options = dict(options)
        do_sample = bool(options.pop("do_sample", False))
        temperature = float(options.pop("temperature", 0.0) or 0.0)
        top_k = int(options.pop("top_k", 0) or 0)
        top_p = float(options.pop("top_p", 1.0) or 1.0)
        options.pop("max_length", None)
        odd = {k: v for k, v in options.items() if _NEUTRAL.get(k, object()) != v}
        if odd:
            raise EvalError(f"generation settings {odd} are not supported by jaxtune's "
                            "generator (greedy, or sampling with temperature, top_k, top_p).")
        if not do_sample:
            return Sampling()
        return Sampling(temperature if temperature > 0 else 1.0, top_k, top_p)
