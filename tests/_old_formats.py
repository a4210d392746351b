"""Turn a store's metadata document back into what an older format wrote, for the tests that
check older stores still read."""
from pyunlearn._format import _SINCE_3, _SINCE_4


def as_format_2(attrs: dict) -> dict:
    """`attrs` (a new store's, without deletions) as a format-2 store had them."""
    for key in _SINCE_3 + _SINCE_4:
        attrs.pop(key, None)
    assert not attrs["ledger"]["records"], "only a store without deletions can be turned back"
    attrs["ledger"] = {"removed_steps": [], "fingerprint": None}
    attrs["format_version"] = 2
    return attrs
