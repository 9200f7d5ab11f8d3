"""Evaluate checkpoints per domain and write a markdown report with tables and plots (see btx_jax/evaluate.py).

    python scripts/evaluate.py --model seed=runs/demo/seed/final --model moe=runs/demo/router/final \
        --workdir seed=runs/demo/seed --out runs/demo/eval
    python scripts/evaluate.py --help

Bad input (a --seq-len beyond a model's max_position_embeddings included) prints one line and exits 2."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from btx_jax.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
