"""Which answer does a model prefer on held-out pairs? Base vs preference-tuned, in transformers.

    python scripts/preference_report.py configs/quickstart-dpo.yaml BASE_DIR TUNED_DIR [--pairs N]

For each held-out pair of the recipe's ``data.eval_sources`` (tokenized and masked by jaxtune's
own pipeline), both models score the chosen and the rejected completion (summed log-probs of
the trained tokens, computed by transformers from the exported folders, so this also checks
that an export loads there) and the script prints, side by side, the share of pairs whose
chosen answer is more likely (by summed log-prob, and by log-prob per trained token, which does
not favour the shorter answer) and the mean log-prob margin.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def pair_scores(model_dir: str, data, n: int):
    """``[(logp_chosen, logp_rejected, tokens_chosen, tokens_rejected)]`` of the first ``n``
    pairs under ``model_dir``."""
    import torch
    from transformers import AutoModelForCausalLM

    from jaxtune.data.preference import pair_tokens

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for d in range(min(n, len(data.docs))):
            sides, counts = [], []
            for side in ("chosen", "rejected"):
                tokens, trained = pair_tokens(data, d, side)
                ids = torch.tensor(tokens[None].astype("int64"))
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
                target = logp.gather(-1, ids[0, 1:, None])[:, 0]
                mask = torch.tensor(trained[1:].astype("float32"))
                sides.append(float((target * mask).sum()))
                counts.append(max(float(mask.sum()), 1.0))
            out.append((*sides, *counts))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("base")
    p.add_argument("tuned")
    p.add_argument("--pairs", type=int, default=10**9)
    args = p.parse_args(argv)

    from jaxtune.config import load_config
    from jaxtune.data.preference import prepare_pairs
    from jaxtune.data.tokenizer import load_tokenizer

    cfg = load_config(args.config, [f"--model.path={args.tuned}", "--data.shuffle=false"])
    data = prepare_pairs(cfg, load_tokenizer(cfg), "eval")
    rows = {}
    for name, folder in (("base", args.base), ("tuned", args.tuned)):
        scores = pair_scores(folder, data, args.pairs)
        wins = sum(c > r for c, r, _, _ in scores) / len(scores)
        per_token = sum(c / nc > r / nr for c, r, nc, nr in scores) / len(scores)
        margin = sum(c - r for c, r, _, _ in scores) / len(scores)
        rows[name] = (wins, per_token, margin, len(scores))
    print(f"{'model':<8} {'prefers chosen':>15} {'per token':>10} {'mean logp margin':>17} "
          f"{'pairs':>6}")
    for name, (wins, per_token, margin, n) in rows.items():
        print(f"{name:<8} {100 * wins:>14.1f}% {100 * per_token:>9.1f}% {margin:>17.2f} {n:>6}")


if __name__ == "__main__":
    main()
