"""What the recorder refuses of a batch: samples whose deletion was requested (training on them
again would undo the deletion). Which model training may go on from is pyunlearn.ledger's rule
(continue_training), which the store applies."""
from __future__ import annotations

import numpy as np

from ..errors import RecorderError


def refuse_forgotten(ids: np.ndarray, forgotten: np.ndarray) -> np.ndarray:
    """`ids`, or RecorderError if a deletion request asked for any of them (training on them
    again would undo the deletion)."""
    if forgotten.size:
        again = ids[np.isin(ids, forgotten)]
        if again.size:
            raise RecorderError(
                f"this batch holds {again.size} sample(s) whose deletion was requested (IDs {again[:5].tolist()}"
                f"{' ...' if again.size > 5 else ''}): training on them again would undo the deletion. Remove them "
                "from the training data; this batch was not declared")
    return ids
