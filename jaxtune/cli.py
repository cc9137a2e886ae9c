"""The ``jaxtune`` command: train, export, inspect-data, print-config, generate, eval, plan,
launch.

Each subcommand parses its own arguments and imports its (heavy) module only when run, so
``jaxtune --help`` and ``jaxtune print-config`` start instantly. User-fixable problems
(:class:`~jaxtune.errors.JaxtuneError`) print one ``error:`` line and exit 2, no traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from jaxtune.errors import JaxtuneError


def _config_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"jaxtune {prog}",
        description=description,
        epilog="Any --section.key=value after the config overrides that field of the recipe.",
    )
    p.add_argument("config", help="YAML recipe, e.g. configs/quickstart.yaml")
    return p


def _load(config: str, overrides: list[str]):
    from jaxtune.config import load_config

    return load_config(config, overrides)


def cmd_print_config(argv: list[str]) -> int:
    p = _config_parser("print-config", "Print the resolved config (recipe + overrides).")
    args, overrides = p.parse_known_args(argv)
    from jaxtune.config import dump_config

    print(dump_config(_load(args.config, overrides)), end="")
    return 0


def cmd_train(argv: list[str]) -> int:
    p = _config_parser("train", "Fine-tune a model as the recipe says.")
    args, overrides = p.parse_known_args(argv)
    cfg = _load(args.config, overrides)
    from jaxtune.trainer import train

    train(cfg)
    return 0


def cmd_inspect_data(argv: list[str]) -> int:
    p = _config_parser("inspect-data", "Show the first examples with the trained tokens marked.")
    p.add_argument("-n", type=int, default=3, help="examples to show (default 3)")
    p.add_argument("--no-color", action="store_true", help="mark trained tokens with [[ ]]")
    args, overrides = p.parse_known_args(argv)
    cfg = _load(args.config, overrides)
    from jaxtune.data.inspect import inspect_data

    inspect_data(cfg, n=args.n, color=None if not args.no_color else False)
    return 0


def cmd_export(argv: list[str]) -> int:
    from jaxtune.export import export_main

    return export_main(argv)


def cmd_generate(argv: list[str]) -> int:
    from jaxtune.generation import generate_main

    return generate_main(argv)


def cmd_eval(argv: list[str]) -> int:
    from jaxtune.evaluation.command import eval_main

    return eval_main(argv)


def cmd_plan(argv: list[str]) -> int:
    from jaxtune.plan import plan_main

    return plan_main(argv)


def cmd_launch(argv: list[str]) -> int:
    from jaxtune.launch import launch_main

    return launch_main(argv)


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "train": (cmd_train, "fine-tune a model from a YAML recipe"),
    "export": (cmd_export, "write a run's checkpoint as a Hugging Face folder or PEFT adapter"),
    "inspect-data": (cmd_inspect_data, "show what the model trains on, trained tokens marked"),
    "print-config": (cmd_print_config, "print the resolved config of a recipe plus overrides"),
    "generate": (cmd_generate, "generate text from a model or run directory"),
    "eval": (cmd_eval, "score a model or run on lm-evaluation-harness tasks"),
    "plan": (cmd_plan, "compile the train step for a TPU/GPU target: memory per chip, FLOPs"),
    "launch": (cmd_launch, "run training on a Cloud TPU slice: jaxtune launch tpu ..."),
}


def _usage() -> str:
    lines = ["usage: jaxtune <command> [args]", "", "commands:"]
    lines += [f"  {name:<14}{help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'jaxtune <command> --help' for a command's arguments."]
    return "\n".join(lines)


#: Commands whose CPU steps run faster with huge pages (jaxtune.host_memory).
_HUGE_PAGE_COMMANDS = ("train", "generate", "eval")


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] and sys.argv[1] in _HUGE_PAGE_COMMANDS:
        from jaxtune.host_memory import reexec_with_huge_pages

        reexec_with_huge_pages()  # the command line as started; returns where not wanted
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name != "plan":  # the only command that compiles for chips it does not have
        from jaxtune.plugins import keep_unusable_plugins_out

        # Else, with the plan extra and no GPU / TPU here, jax prints their plugins' errors.
        keep_unusable_plugins_out()
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        print(f"error: unknown command '{name}'.{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[name][0](rest)
    except JaxtuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
