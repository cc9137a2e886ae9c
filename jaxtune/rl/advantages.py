"""Group-relative advantages from rewards, exactly as TRL's ``GRPOTrainer`` computes them.

Rows come in groups of ``G`` completions of the same prompt, consecutive. With ``F`` reward
functions and weights ``w``::

    reward_i   = nansum_f(w_f * r_if)               (NaN where every function gave None)
    mean_i     = nanmean(reward over i's group)
    std_i      = nanstd(reward over i's group, ddof=1)   scale_rewards: group
               = nanstd(reward over the whole batch, ddof=1)   batch
    advantage  = (reward_i - mean_i) / (std_i + 1e-4)    (none: reward_i - mean_i)

and a completion no function scored gets advantage 0. ``nanstd`` is TRL's (``ddof=1`` over
the finite values). The batch is the global one: every process's rewards together.
"""

from __future__ import annotations

import warnings

import numpy as np

STD_EPS = 1e-4  # added to the std before dividing, as TRL


def nanstd(x: np.ndarray, axis=None) -> np.ndarray:
    """TRL's ``nanstd``: the unbiased (``ddof=1``) std over the finite values."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN group: NaN, as TRL
        mean = np.nanmean(x, axis=axis, keepdims=True)
        count = np.sum(~np.isnan(x), axis=axis, keepdims=True)
        var = np.nanmean((x - mean) ** 2, axis=axis, keepdims=True)
        var = np.where(count > 1, var * count / np.maximum(count - 1, 1), np.nan)
    return np.sqrt(np.squeeze(var, axis=axis) if axis is not None else var.reshape(()))


def total_rewards(per_function: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``[N]`` weighted sums over functions (``nansum``); NaN where no function scored."""
    total = np.nansum(per_function * weights[None, :], axis=1).astype(np.float32)
    total[np.isnan(per_function).all(axis=1)] = np.nan
    return total


def advantages(per_function: np.ndarray, weights: np.ndarray, num_generations: int,
               scale_rewards: str = "group") -> tuple[np.ndarray, np.ndarray]:
    """``(advantages [N], std [N])`` of ``N`` completions in groups of ``num_generations``;
    ``std`` is the std each advantage was (or, with ``none``, would be) divided by."""
    rewards = total_rewards(per_function, weights)
    grouped = rewards.reshape(-1, num_generations)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.repeat(np.nanmean(grouped, axis=1), num_generations)
    if scale_rewards in ("group", "none"):
        std = (np.repeat(nanstd(grouped, axis=1), num_generations) if num_generations > 1
               else np.zeros_like(rewards))
    elif scale_rewards == "batch":
        std = np.full_like(rewards, nanstd(rewards) if rewards.size > 1 else 0.0)
    else:
        raise ValueError(f"unknown scale_rewards {scale_rewards!r}")
    adv = rewards - mean
    if scale_rewards != "none":
        adv = adv / (std + STD_EPS)
    return np.nan_to_num(adv, nan=0.0).astype(np.float32), std.astype(np.float32)


def informative_groups(per_function: np.ndarray, weights: np.ndarray,
                       num_generations: int) -> np.ndarray:
    """``[N / G]`` bool: groups whose total rewards are not all equal (DAPO's dynamic
    sampling keeps only these: a group of equal rewards has zero advantages, no signal)."""
    rewards = total_rewards(per_function, weights).reshape(-1, num_generations)
    finite = np.where(np.isnan(rewards), np.nan, rewards)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        spread = np.nanmax(finite, axis=1) - np.nanmin(finite, axis=1)
    return np.nan_to_num(spread, nan=0.0) > 0
