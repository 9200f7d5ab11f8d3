"""The `btx` command line: main.py dispatches to one module per command (`btx --help` lists them); their
shared error path and signal handling are btx_jax/command_line.py."""
