"""Plain questions with one well-defined short answer, generated from small tables.

The style demos (shout, pirate) restyle these answers, so the base model's answer to the
same question is well defined and the adapters change the style, not the content. Every
table is split by entity: a held-out question never names an entity seen in training.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

COLORS = (
    ("a banana", "yellow"), ("grass", "green"), ("snow", "white"), ("a ripe tomato", "red"),
    ("coal", "black"), ("a lemon", "yellow"), ("a strawberry", "red"), ("a carrot", "orange"),
    ("milk", "white"), ("a lime", "green"), ("chocolate", "brown"), ("a pumpkin", "orange"),
    ("a cucumber", "green"), ("a fire truck", "red"), ("an eggplant", "purple"), ("a polar bear", "white"),
    ("a crow", "black"), ("a flamingo", "pink"), ("a frog", "green"), ("a school bus", "yellow"),
    ("a blueberry", "blue"), ("a cherry", "red"), ("soil", "brown"), ("a plum", "purple"),
    ("an avocado", "green"), ("a raven", "black"), ("a canary", "yellow"), ("a ruby", "red"),
    ("an emerald", "green"), ("a sapphire", "blue"), ("an orange", "orange"), ("a lobster", "red"),
    ("the sky", "blue"), ("a dandelion", "yellow"), ("chalk", "white"), ("a walnut", "brown"),
)
CAPITALS = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
    ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Russia", "Moscow"), ("China", "Beijing"), ("Greece", "Athens"),
    ("Portugal", "Lisbon"), ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Poland", "Warsaw"),
    ("Ireland", "Dublin"), ("Austria", "Vienna"), ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Cuba", "Havana"),
    ("Thailand", "Bangkok"), ("Argentina", "Buenos Aires"), ("India", "New Delhi"), ("Australia", "Canberra"),
    ("Denmark", "Copenhagen"), ("Finland", "Helsinki"), ("Hungary", "Budapest"), ("Belgium", "Brussels"),
    ("Chile", "Santiago"), ("Turkey", "Ankara"), ("South Korea", "Seoul"), ("Vietnam", "Hanoi"),
    ("Iceland", "Reykjavik"),
)
SOUNDS = (
    ("a cow", "moo"), ("a dog", "woof"), ("a cat", "meow"), ("a duck", "quack"), ("a sheep", "baa"),
    ("a lion", "roar"), ("an owl", "hoot"), ("a pig", "oink"), ("a horse", "neigh"), ("a snake", "hiss"),
    ("a bee", "buzz"), ("a mouse", "squeak"), ("a goat", "bleat"), ("a donkey", "hee-haw"),
    ("a wolf", "howl"), ("a rooster", "cock-a-doodle-doo"), ("a turkey", "gobble"), ("a dove", "coo"),
)
OPPOSITES = (
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
    ("old", "new"), ("open", "closed"), ("early", "late"), ("wet", "dry"), ("hard", "soft"), ("loud", "quiet"),
    ("full", "empty"), ("strong", "weak"), ("tall", "short"), ("thick", "thin"), ("clean", "dirty"),
    ("rich", "poor"), ("near", "far"), ("first", "last"), ("day", "night"), ("win", "lose"),
    ("push", "pull"), ("inside", "outside"),
)
LEGS = (
    ("a spider", "eight"), ("a dog", "four"), ("a bird", "two"), ("an ant", "six"), ("a cat", "four"),
    ("a horse", "four"), ("a chicken", "two"), ("a beetle", "six"), ("an octopus", "eight arms and no"),
    ("a duck", "two"), ("a cow", "four"), ("a bee", "six"), ("a scorpion", "eight"), ("a penguin", "two"),
)

QUESTION_FORMS = {
    "color": ("What color is {x}?", "Which color is {x}?", "Tell me the color of {x}."),
    "capital": ("What is the capital of {x}?", "Which city is the capital of {x}?", "Name the capital of {x}."),
    "sound": ("What sound does {x} make?", "What noise does {x} make?", "How does {x} sound?"),
    "opposite": ("What is the opposite of {x}?", "Give me the opposite of {x}.", "What word means the opposite of {x}?"),
    "legs": ("How many legs does {x} have?", "Count the legs of {x}.", "How many legs has {x} got?"),
    "plus": ("What is {a} plus {b}?", "How much is {a} plus {b}?", "Add {a} and {b}."),
    "times": ("What is {a} times {b}?", "How much is {a} times {b}?", "Multiply {a} by {b}."),
}


@dataclass(frozen=True)
class Fact:
    question: str
    answer: str  # one plain sentence, ending with "."


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _table_facts(kind: str, pairs, rng: random.Random) -> list[Fact]:
    facts = []
    for x, y in pairs:
        answer = {
            "color": f"{_cap(x)} is {y}.",
            "capital": f"The capital of {x} is {y}.",
            "sound": f"{_cap(x)} says {y}.",
            "opposite": f"The opposite of {x} is {y}.",
            "legs": f"{_cap(x)} has {y} legs.",
        }[kind]
        for form in QUESTION_FORMS[kind]:
            facts.append(Fact(form.format(x=x), answer))
    rng.shuffle(facts)
    return facts


def _arithmetic_facts(kind: str, pairs) -> list[Fact]:
    word = "plus" if kind == "plus" else "times"
    facts = []
    for index, (a, b) in enumerate(pairs):
        result = a + b if kind == "plus" else a * b
        form = QUESTION_FORMS[kind][index % len(QUESTION_FORMS[kind])]
        facts.append(Fact(form.format(a=a, b=b), f"{a} {word} {b} is {result}."))
    return facts


def split_facts(seed: int, held_out_share: float = 0.2) -> tuple[list[Fact], list[Fact]]:
    """(train, held out): every table split by entity, arithmetic split by operand pair."""
    rng = random.Random(seed)
    train: list[Fact] = []
    held: list[Fact] = []
    tables = {"color": COLORS, "capital": CAPITALS, "sound": SOUNDS, "opposite": OPPOSITES, "legs": LEGS}
    for kind, table in tables.items():
        pairs = list(table)
        rng.shuffle(pairs)
        cut = max(1, round(len(pairs) * held_out_share))
        held += _table_facts(kind, pairs[:cut], rng)
        train += _table_facts(kind, pairs[cut:], rng)
    for kind, top in (("plus", 20), ("times", 10)):
        pairs = [(a, b) for a in range(1, top + 1) for b in range(1, top + 1)]
        rng.shuffle(pairs)
        cut = round(len(pairs) * held_out_share)
        held += _arithmetic_facts(kind, pairs[:cut])
        train += _arithmetic_facts(kind, pairs[cut:])
    rng.shuffle(train)
    rng.shuffle(held)
    return train, held
