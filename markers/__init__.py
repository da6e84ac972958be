"""The suite's markers and command-line options: registry, validation, and the hooks that apply them."""
