__version__ = "0.3.0.dev0"  # the 0.3.0 changes: CHANGELOG "Unreleased"
