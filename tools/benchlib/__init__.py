"""Code the benchmark scripts in tools/ share: a script calls
``benchlib.boot.enter(__file__)`` first (venv and import path), then imports
what it needs from the modules here (each named after what it holds)."""
