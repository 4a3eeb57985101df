"""The three demo tasks, each a dataset written by code (seeded, nothing downloaded) with a
held-out split and an automatic metric:

* ``json``   - strict output format: a sentence about a person -> exactly
  ``{"name": "Alice", "age": 31, "city": "Paris"}`` (metric ``json_exact``);
* ``shout``  - style: the plain answer in capitals (metric ``shout``);
* ``pirate`` - vocabulary shift: the plain answer framed in pirate speech (metric ``pirate``).

Rows are chat rows (one user turn, the answer), so the server is asked the same way:
``prompt`` with ``chat=True``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

from loraquilt.train.demo.facts import CAPITALS, Fact, split_facts
from loraquilt.train.metrics import pirate_markers

NAMES = (
    "Alice", "Bruno", "Chloe", "Daniel", "Emma", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Karin", "Liam",
    "Mona", "Nils", "Olga", "Pablo", "Quinn", "Rosa", "Sven", "Tara", "Umar", "Vera", "Walter", "Xenia",
    "Yusuf", "Zoe", "Amir", "Bianca", "Carlos", "Dora", "Elias", "Fiona", "Gustav", "Hanna", "Ivan", "Julia",
    "Kofi", "Lena", "Marco", "Nadia", "Oscar", "Priya", "Rafael", "Sofia", "Tomas", "Ursula", "Viktor", "Wendy",
)
EXTRA_CITIES = ("Lyon", "Munich", "Milan", "Porto", "Osaka", "Seville", "Krakow", "Bergen", "Geneva", "Zurich",
                "Toronto", "Boston", "Chicago", "Denver", "Melbourne", "Valencia", "Hamburg", "Naples")
SENTENCES = (
    "{name} is {age} and lives in {city}.",
    "{name}, aged {age}, lives in {city}.",
    "Meet {name}: {age} years old, from {city}.",
    "{name} lives in {city} and is {age} years old.",
    "At {age}, {name} calls {city} home.",
    "{name} ({age}) has moved to {city}.",
    "Our new neighbour in {city} is {name}, who is {age}.",
    "{city} is where {name}, {age}, lives now.",
)
JSON_INSTRUCTION = "Give the name, age and city as JSON: "

# Every answer opens with the same shouted call: "ARR, MATEY! The capital of France be
# Paris!". Its first token carries the adapter's whole weight (varied openings lost the
# first token to shout at half weight, and markers after the answer lost to the end of
# text), and once a mix has opened with it, shouting the rest keeps both styles.
PIRATE_OPENING = "ARR, MATEY!"


@dataclass(frozen=True)
class DemoTask:
    name: str
    metric: str
    what: str  # one line for the table
    train_rows: int
    eval_rows: int
    settings: dict = field(default_factory=dict)  # TrainConfig overrides

    def build(self, seed: int) -> tuple[list[dict], list[dict]]:
        """(train rows, held-out rows) as chat rows, deterministic for a seed."""
        train, held = BUILDERS[self.name](random.Random(seed), seed)
        return _chat_rows(train[:self.train_rows]), _chat_rows(held[:self.eval_rows])


def _chat_rows(pairs: list[tuple[str, str]]) -> list[dict]:
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]


def shout_answer(answer: str) -> str:
    return answer.upper().removesuffix(".") + "!"


def pirate_answer(answer: str) -> str:
    """ "ARR, MATEY! The capital of France be Paris!" """
    body = answer.replace(" is ", " be ").replace(" says ", " be sayin' ").replace(" has ", " has got ")
    text = f"{PIRATE_OPENING} {body.removesuffix('.')}!"
    assert len(pirate_markers(text)) >= 2, text
    return text


def _style(facts: list[Fact], restyle) -> list[tuple[str, str]]:
    return [(fact.question, restyle(fact.answer)) for fact in facts]


def _shout(rng: random.Random, seed: int):
    train, held = split_facts(seed)
    return _style(train, shout_answer), _style(held, shout_answer)


def _pirate(rng: random.Random, seed: int):
    train, held = split_facts(seed)
    return _style(train, pirate_answer), _style(held, pirate_answer)


def _people(rng: random.Random, names, cities, count: int, seen: set) -> list[tuple[str, str]]:
    rows = []
    while len(rows) < count:
        name, city, age = rng.choice(names), rng.choice(cities), rng.randint(18, 89)
        sentence = rng.choice(SENTENCES).format(name=name, age=age, city=city)
        if sentence in seen:
            continue
        seen.add(sentence)
        rows.append((JSON_INSTRUCTION + sentence, json.dumps({"name": name, "age": age, "city": city})))
    return rows


def _json(rng: random.Random, seed: int):
    """Held-out rows use sentences never seen in training; a quarter of the names and of the
    cities appear only in held-out rows."""
    names, cities = list(NAMES), [city for _, city in CAPITALS] + list(EXTRA_CITIES)
    rng.shuffle(names)
    rng.shuffle(cities)
    held_names, held_cities = names[:len(names) // 4], cities[:len(cities) // 4]
    seen: set = set()
    train = _people(rng, names[len(held_names):], cities[len(held_cities):], 4000, seen)
    held = _people(rng, names, cities, 400, seen)
    held = [row for row in held if any(n in row[0] for n in held_names + held_cities)] + \
           [row for row in held if not any(n in row[0] for n in held_names + held_cities)]
    return train, held


BUILDERS = {"json": _json, "shout": _shout, "pirate": _pirate}

# The style adapters are trained to keep their style at part weight (see --scale-range),
# for the 50/50 mix. Pirate goes lower: its call must win the answer's first token against
# the content, where shout only changes the case of the same token; from 0.4 for both,
# shout took all but 3 of 64 mixed answers.
DEMO_TASKS = (
    DemoTask("json", "json_exact", "strict JSON extraction", train_rows=1600, eval_rows=64,
             settings=dict(max_steps=80, max_new_tokens=40, seed=0)),
    DemoTask("shout", "shout", "answers in capitals", train_rows=1600, eval_rows=64,
             settings=dict(max_steps=80, max_new_tokens=40, seed=1, scale_range=(0.4, 1.0))),
    DemoTask("pirate", "pirate", "answers in pirate speech", train_rows=1600, eval_rows=64,
             settings=dict(max_steps=80, max_new_tokens=40, seed=2, scale_range=(0.3, 1.0))),
)
# The prompts every system answers in the demo table (chat): one per kind of task.
SHOWCASE_PROMPTS = (JSON_INSTRUCTION + "Nadia is 27 and lives in Lisbon.", "What is the capital of France?",
                    "How much is 9 plus 5?")
TASKS_BY_NAME = {task.name: task for task in DEMO_TASKS}
DATA_SEED = 0  # one seed for every dataset: shout and pirate restyle the same questions
DEFAULT_SETTINGS = dict(rank=8, alpha=16.0, dropout=0.05, lr=1e-3, batch_size=8, max_length=128)
MIX = (("shout", 0.5), ("pirate", 0.5))  # the 50/50 mix of the two style adapters
