"""`_library_to_load`: whether adding a request loads its library (timed as a load by the
admission controller), for one name and for a composition's names."""

from types import SimpleNamespace

from moska.server.admission import RequestCost
from moska.server.async_engine import _library_to_load


def _engine(loaded: list[str]) -> SimpleNamespace:
    return SimpleNamespace(libraries=SimpleNamespace(loaded_names=lambda: list(loaded)))


def test_single_name_and_composition():
    cost = RequestCost(10, library_load_tokens=5000)
    engine = _engine(["a", "b"])
    assert _library_to_load(engine, "a", cost) == 0
    assert _library_to_load(engine, "c", cost) == 5000
    # a composition loads nothing once every part is loaded (a list was never "in" the names)
    assert _library_to_load(engine, ["a", "b"], cost) == 0
    assert _library_to_load(engine, ["a"], cost) == 0
    assert _library_to_load(engine, ["a", "c"], cost) == 5000
    assert _library_to_load(engine, None, cost) == 0
    assert _library_to_load(engine, ["c"], RequestCost(10)) == 0  # nothing to load: no timing
