"""Built-in methods, one file each. Importing this package registers them."""

from kvbench.methods import full  # noqa: F401
