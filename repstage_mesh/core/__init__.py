"""The domain core: models, the pure replicated state machine, observations, naming, addresses
and the one exception tree (errors.py). No I/O and no I/O library (an import-linter contract)."""
