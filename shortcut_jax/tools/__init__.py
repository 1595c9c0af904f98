"""Secondary command-line tools (``python -m shortcut_jax.tools.<name>``)."""
