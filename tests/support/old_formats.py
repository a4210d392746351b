"""Turn a store's metadata document back into what an older format wrote, for the tests that
check older stores still read."""
from pyunlearn.store.metadata import _SINCE_3, _SINCE_4


def as_format_2(attrs: dict) -> dict:
    """`attrs` (a new store's, without deletions) as a format-2 store had them."""
    for key in _SINCE_3 + _SINCE_4:
        attrs.pop(key, None)
    assert not attrs["ledger"]["records"], "only a store without deletions can be turned back"
    attrs["ledger"] = {"removed_steps": [], "fingerprint": None}
    attrs["format_version"] = 2
    return attrs


def as_format_3(attrs: dict, removed_steps: list[int], fingerprint: str, pending: dict | None = None) -> dict:
    """`attrs` (a store without deletions) as format 3 had them after deletions of
    `removed_steps` giving the model `fingerprint` (and a `pending` one): the resume point stayed
    at the final model, since format 3 refused training after a deletion. Re-sealed."""
    from pyunlearn.store.metadata import attrs_checksum

    for key in _SINCE_4 + ("checksum",):
        attrs.pop(key, None)
    attrs["ledger"] = {"removed_steps": list(removed_steps), "fingerprint": fingerprint}
    if pending is not None:
        attrs["ledger"]["pending"] = pending
    attrs["resume_point"].pop("requests")
    attrs["format_version"] = 3
    attrs["checksum"] = attrs_checksum(attrs)
    return attrs
