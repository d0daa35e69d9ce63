"""The dataclass <-> ConfigDict conventions of jaxopd/configdict.py, on small dataclasses of their own."""

import dataclasses

from jaxopd.configdict import config_dict_of, from_config_dict


@dataclasses.dataclass(frozen=True)
class Item:
    path: str
    weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class Holder:
    sets: dict[str, Item] = dataclasses.field(default_factory=dict)
    name: str = "x"


def test_named_dataclasses_round_trip_and_override_by_key():
    holder = Holder(sets={"math": Item("m.jsonl", 0.7), "chat": Item("c.jsonl")})
    config = config_dict_of(Holder, holder)
    assert list(config.sets.keys()) == ["chat", "math"]  # ml_collections sorts the names
    config.sets.math.weight = 0.5  # what --config.sets.math.weight=0.5 does
    problems: list[str] = []
    rebuilt = from_config_dict(Holder, config, problems)
    assert problems == [] and rebuilt.sets == {"chat": Item("c.jsonl"), "math": Item("m.jsonl", 0.5)}
    assert from_config_dict(Holder, config_dict_of(Holder), problems) == Holder()


def test_named_dataclasses_problems_name_the_item_and_key():
    problems: list[str] = []
    assert from_config_dict(Holder, {"sets": {"math": {"weight": "heavy"}, "chat": {"path": "c", "size": 3}}},
                            problems) is None
    assert "config.sets.math.path is missing: set it in the config file" in problems
    assert "config.sets.math.weight='heavy' must be of type float" in problems
    assert "config.sets.chat.size is not a key of Item: remove it from the config file" in problems
    problems.clear()
    from_config_dict(Holder, {"sets": ["math"]}, problems)
    assert problems == ["config.sets=['math'] must be a dict of named Item dicts"]
