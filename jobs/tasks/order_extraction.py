"""Task `order_extraction` (structured extraction, JSON field F1): a café order message -> a flat JSON object.

Output: {"name": ..., "item": ..., "size": ..., "quantity": ...} with the item singular and lowercase, the size one of
small/medium/large and the quantity an integer (messages spell it as a word or digits).
Registered in `jobs.tasks`; regenerate data with `python -m jobs.tasks.generate`.
"""

from __future__ import annotations

import json
import random
import re

from jobs.tasks.common import capitalise, unique_rows

NAME = "order_extraction"
KIND = "extraction"
METRIC = "json_f1"
INSTRUCTION = (
    "Extract the order from the customer's message as JSON with exactly these keys: "
    '{"name": customer name, "item": drink in singular lowercase, "size": small, medium or large, '
    '"quantity": integer}. Output only the JSON object on one line.'
)

NAMES = (
    "Sam", "Priya", "Lucas", "Mei", "Omar", "Hannah", "Diego", "Aisha", "Tom", "Yuki", "Fatima", "Liam", "Sofia",
    "Kofi", "Elena", "Raj", "Chloe", "Mateo", "Nina", "Ben", "Zara", "Ivan", "Grace", "Jonas", "Leila", "Marco",
    "Ana", "Felix", "Ruth", "Kenji",
)  # fmt: skip
# (singular, plural)
ITEMS = (
    ("oat latte", "oat lattes"), ("cappuccino", "cappuccinos"), ("green tea", "green teas"),
    ("hot chocolate", "hot chocolates"), ("espresso", "espressos"), ("iced americano", "iced americanos"),
    ("chai latte", "chai lattes"), ("flat white", "flat whites"), ("mocha", "mochas"), ("lemonade", "lemonades"),
    ("orange juice", "orange juices"), ("matcha latte", "matcha lattes"), ("iced tea", "iced teas"),
    ("smoothie", "smoothies"),
)  # fmt: skip
SIZES = ("small", "medium", "large")
# Size words in the message -> canonical size.
SIZE_WORDS = {"small": "small", "medium": "medium", "large": "large", "regular": "medium", "big": "large"}
NUMBER_WORDS = ("one", "two", "three", "four", "five", "six")
TEMPLATES = (
    "Hi, this is {name}. Can I get {qty} {size} {item}, please?",
    "{qty} {size} {item} for {name}, thanks!",
    "Order for {name}: {qty} {item}, {size} size.",
    "Could you make me {qty} {size} {item}? Name's {name}.",
    "{name} here. I'd like {qty} {item}, {size} please.",
    "Hey! {qty} {size} {item} to go. It's for {name}.",
    "Please put down {qty} {size} {item} under {name}.",
)


def _quantity_text(rng: random.Random, quantity: int) -> str:
    if quantity == 1:
        return rng.choice(("a", "one", "1"))
    return rng.choice((NUMBER_WORDS[quantity - 1], str(quantity)))


def make_one(rng: random.Random) -> tuple[str, str]:
    name = rng.choice(NAMES)
    singular, plural = rng.choice(ITEMS)
    size_word = rng.choice(tuple(SIZE_WORDS))
    quantity = rng.randint(1, 6)
    qty = _quantity_text(rng, quantity)
    template = rng.choice(TEMPLATES)
    if qty == "a" and template.startswith("{qty}"):
        qty = "one"
    text = template.format(name=name, qty=qty, size=size_word, item=singular if quantity == 1 else plural)
    text = re.sub(r"\ba (?=[aeiou])", "an ", text)
    output = {"name": name, "item": singular, "size": SIZE_WORDS[size_word], "quantity": quantity}
    return capitalise(text), json.dumps(output, ensure_ascii=False)


def make_rows(rng: random.Random, n: int) -> list[dict]:
    return unique_rows(rng, n, make_one, NAME)
