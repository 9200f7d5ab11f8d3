#!/usr/bin/env python
"""Memory and scale plan: AOT-compile the real train step on abstract inputs and report, per device, parameter /
optimizer / gradient / temporary bytes, FLOPs per step, and the largest global batch that fits (see
btx_jax/train/plan.py).

    python scripts/plan.py --config configs/expert.py:wiki --devices 8 --phase expert,router,sft \
        --experts 3 --top-k 2 --batch 32 --device-memory 80GB --search
    python scripts/plan.py --config configs/sft.py:wiki --phase sft --target tpu:v5e-16 --search
    python scripts/plan.py --help
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from btx_jax.train.plan import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
