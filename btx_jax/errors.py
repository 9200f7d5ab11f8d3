"""`UserError`: the base of every error that is the user's to fix (a bad config value, file, checkpoint, input,
a full disk, a diverged run).  Command lines print such an error as one line and exit 2 (btx_jax/command_line.py);
anything else is a bug and keeps its traceback.  The subclasses live with the code that raises them."""
from __future__ import annotations


class UserError(Exception):
    """An error whose message tells the user what to change."""
