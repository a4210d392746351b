"""Judging a forgetting method: metrics (UA, RA, TA, MIA and the rest) and experiments that put
every method beside Original, Retrain and a second Retrain seed with a stated noise floor."""
from . import experiment, metrics

__all__ = ["metrics", "experiment"]
