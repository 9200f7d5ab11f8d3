"""List a lean checkpoint's chain with each link's status (see btx_jax/chain.py, docs/finals.md).

    python scripts/chain.py runs/btx/sft/final
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from btx_jax.chain import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
