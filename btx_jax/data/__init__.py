"""btx_jax.data: sources (HF datasets), tokenizers, tokenised stores, packing, SFT formatting, mixtures,
grain loading.

See docs/data.md and the docstrings of pipeline.py (config schema), sources.py (source
schema), store.py (tokenised store), loader.py (grain), packing.py (batch layout and packing) and
sft.py (templates, loss mask).
"""

from btx_jax.data.bundled import BUNDLED_DATA_DIR, BUNDLED_TOKENIZER, bundled_source, mixture_config
from btx_jax.data.errors import DataError
from btx_jax.data.pipeline import Pipeline, eval_batches, make_pipeline, measure_throughput, prepare, prepare_config
from btx_jax.data.tokenizer import Tokenizer, check_vocab_fits, load_tokenizer

__all__ = [
    "BUNDLED_DATA_DIR",
    "BUNDLED_TOKENIZER",
    "DataError",
    "Pipeline",
    "Tokenizer",
    "bundled_source",
    "check_vocab_fits",
    "eval_batches",
    "load_tokenizer",
    "make_pipeline",
    "measure_throughput",
    "mixture_config",
    "prepare",
    "prepare_config",
]
