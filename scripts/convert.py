"""Convert checkpoints between Hugging Face / PEFT / mergoo and btx_jax's own format (see btx_jax/convert.py).

    python scripts/convert.py hf-to-btx SRC DST      # btx-to-hf, peft-to-btx, ..., mixtral-to-btx, btx-to-mixtral
    python scripts/convert.py --help
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from btx_jax.convert import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
