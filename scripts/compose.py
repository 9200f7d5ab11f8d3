#!/usr/bin/env python
"""Compose experts on a base Llama into a LoRA-MoE (mergoo semantics) or an FFN-MoE (Branch-Train-MiX's mix step).

    python scripts/compose.py BASE EXPERT [EXPERT ...] --out DST --top-k 2 [--seed-expert]
                              [--router-init normal|zeros] [--router-layers 0,1,...] [--format btx|mergoo]
    python scripts/compose.py SEED EXPERT [EXPERT ...] --mode ffn --out DST --top-k 2 [--seed-expert]
                              [--shared average|seed] [--max-drift 0.5] [--format btx|mixtral]

BASE is an HF Llama directory; each EXPERT a PEFT adapter directory or a btx_jax LoRA checkpoint.  With
--mode ffn each EXPERT may also be a dense model branched from SEED (HF dir or btx checkpoint of an `ffn` /
`full` phase); the result is a Mixtral-architecture model (btx_jax/compose_ffn.py).
Bad input exits with status 2 and one line on stderr; nothing is written then.  The code is btx_jax/compose_cli.py
(`main`).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from btx_jax.compose_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
