"""`python -m train sweep`: variants of a run trained one after another, compared in one table and plots."""

from pathlib import Path

SHIPPED = Path(__file__).with_name("variants.toml")  # the original's six runs, `python -m train sweep`'s default
