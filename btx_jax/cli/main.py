"""btx: Branch-Train-MiX post-training of Llama models with LoRA experts, in JAX/Flax.

    btx COMMAND [--flag=value ...]        btx COMMAND --help: the command's flags and examples

Flags are `--long-name=value` (or `--long-name value`), words joined by `-`; a config's keys are overridden as
`--config.train.steps=2`.  Bad input of any kind (usage, an unknown flag, a bad value, a missing file) is one
stderr line `error: ...` and exit code 2."""
from __future__ import annotations

import importlib
import sys
from typing import Sequence

# name: (the module whose main(argv) runs it on the arguments after the name, one line of help)
COMMANDS = {
    "train": ("btx_jax.cli.train", "train one phase (pretrain, expert, router, sft) from a config"),
    "prepare-data": ("btx_jax.cli.prepare_data", "tokenise a config's data sources ahead of training"),
    "plan": ("btx_jax.cli.plan", "memory and scale plan: compile the train step, report bytes per device"),
    "compose": ("btx_jax.cli.compose", "compose experts on a base Llama into a LoRA-MoE or an FFN-MoE"),
    "convert": ("btx_jax.cli.convert", "convert checkpoints between HF / PEFT / mergoo / Mixtral and btx"),
    "evaluate": ("btx_jax.cli.evaluate", "evaluate checkpoints per domain; markdown report with plots"),
    "generate": ("btx_jax.cli.generate", "generate text from a checkpoint"),
    "demo": ("btx_jax.cli.demo", "the whole pipeline on a tiny Llama with the bundled data, on a CPU"),
    "lm-eval": ("btx_jax.cli.lm_eval", "lm-evaluation-harness with the `btx` model and the bundled tasks"),
    "chain": ("btx_jax.cli.chain", "list a lean checkpoint's chain with each link's status"),
    "rehearse": ("btx_jax.cli.rehearse", "rehearse the seed's recipe at a chosen shape, every phase measured"),
    "train-tokenizer": ("btx_jax.cli.train_tokenizer", "train the bundled sentencepiece tokenizer"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {help_line}" for name, (_, help_line) in COMMANDS.items()]
    return "usage: btx COMMAND [--flag=value ...]\n\ncommands:\n" + "\n".join(lines) + "\n\n" + __doc__.split(
        "\n\n", 2)[2] + "\n\nexample:\n  btx train --config=expert:synthetic --workdir=/tmp/x --config.train.steps=2"


def command(name: str, argv: Sequence[str]) -> int:
    """Run command `name` on `argv` (the arguments after it): its exit code."""
    return int(importlib.import_module(COMMANDS[name][0]).main(list(argv)) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """`btx COMMAND ...` (argv: sys.argv[1:] by default): the command's exit code; usage errors exit 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        from btx_jax.command_line import fail
        import difflib
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        fail(f"btx: unknown command {name!r}" + (f" (did you mean {close[0]}?)" if close else "") +
             f"; the commands: {', '.join(COMMANDS)}")
    return command(name, rest)


def lm_eval() -> int:
    """The `btx-lm-eval` console script: `btx lm-eval`."""
    return main(["lm-eval", *sys.argv[1:]])
