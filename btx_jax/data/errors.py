"""The one exception type of the data pipeline."""
from btx_jax.errors import UserError


class DataError(UserError, ValueError):
    """Bad data input (missing file, wrong field, empty dataset, bad ratios, bad encoding, tokenizer
    too large for the model). The message is one line and names the file or field."""
