"""Task `viggo` (meaning representation to text, ROUGE-L): a ViGGO-like video-game MR -> one English sentence.

Input like `inform(name[Dirt Rally], genres[racing, simulation], rating[good], platforms[PC])`; dialogue acts are
inform, recommend, give_opinion and confirm. Each act has one deterministic sentence plan, so the reference is a
function of the MR (learnable), while the exact wording is not guessable zero-shot.
Registered in `jobs.tasks`; regenerate data with `python -m jobs.tasks.generate`.
"""

from __future__ import annotations

import random

from jobs.tasks.common import join_words, unique_rows

NAME = "viggo"
KIND = "mr_to_text"
METRIC = "rouge_l"
INSTRUCTION = (
    "Turn the meaning representation about a video game into one fluent English sentence that mentions every "
    "slot value and adds nothing else. Output only the sentence."
)

GAMES = (
    "Starfall Odyssey", "Iron Harbor", "Pixel Pilgrims", "Neon Drift", "Crystal Keep", "Shadow Ledger",
    "Moonlit Meadows", "Rust Runners", "Quantum Quarry", "Frostbite Fortress", "Sky Tavern", "Echo Vale",
    "Copper Crown", "Lantern Deep", "Velvet Circuit", "Thunder Gulch", "Ember Isles", "Hollow Tide",
    "Paper Knights", "Granite Gods", "Solar Sprint", "Whisper Woods", "Brass Legion", "Orbit Farm",
)  # fmt: skip
GENRES = (
    "role-playing", "shooter", "platformer", "puzzle", "strategy", "racing", "adventure", "fighting",
    "simulation", "sports",
)  # fmt: skip
RATINGS = ("excellent", "good", "average", "poor")
PLATFORMS = ("PC", "PlayStation", "Xbox", "Nintendo Switch")
DEVELOPERS = ("Bluebird Studios", "Nova Works", "Tiny Anvil", "Redleaf Games", "Quiet Owl", "Gridline")
PERSPECTIVES = ("first person", "third person", "side view", "bird view")
OPINION = {  # give_opinion with a genre: rating word kept, plus a fixed remark per rating
    "excellent": "an excellent {g} game, one of the best I have played",
    "good": "a good {g} game and pretty fun",
    "average": "just an average {g} game",
    "poor": "a poor {g} game and not worth your time",
}


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _mr(act: str, slots: dict[str, str]) -> str:
    return f"{act}(" + ", ".join(f"{key}[{value}]" for key, value in slots.items()) + ")"


def _inform(rng: random.Random) -> tuple[str, str]:
    name, rating = rng.choice(GAMES), rng.choice(RATINGS)
    genres = rng.sample(GENRES, rng.choice((1, 1, 2)))
    slots = {"name": name, "genres": ", ".join(genres), "rating": rating}
    extras = rng.sample(("release_year", "developer", "platforms", "player_perspective"), rng.randint(0, 2))
    words = f"{name} is {_article(rating)} {rating} {join_words(genres)} game"
    if "release_year" in extras:
        year = str(rng.randint(1995, 2023))
        slots["release_year"] = year
        words += f" released in {year}"
    if "developer" in extras:
        slots["developer"] = rng.choice(DEVELOPERS)
        words += f" by {slots['developer']}"
    if "player_perspective" in extras:
        slots["player_perspective"] = rng.choice(PERSPECTIVES)
        words += f" played from a {slots['player_perspective']} perspective"
    if "platforms" in extras:
        platforms = rng.sample(PLATFORMS, rng.choice((1, 2)))
        slots["platforms"] = ", ".join(platforms)
        words += f" for {join_words(platforms)}"
    return _mr("inform", slots), words + "."


def _recommend(rng: random.Random) -> tuple[str, str]:
    name, genre = rng.choice(GAMES), rng.choice(GENRES)
    slots = {"name": name, "genres": genre}
    sentence = f"If you like {genre} games, you should try {name}"
    if rng.random() < 0.6:
        platform = rng.choice(PLATFORMS)
        slots["platforms"] = platform
        sentence += f" on {platform}"
    return _mr("recommend", slots), sentence + "."


def _give_opinion(rng: random.Random) -> tuple[str, str]:
    name, rating = rng.choice(GAMES), rng.choice(RATINGS)
    slots = {"name": name, "rating": rating}
    if rng.random() < 0.5:
        genre = rng.choice(GENRES)
        slots["genres"] = genre
        return _mr("give_opinion", slots), f"I think {name} is {OPINION[rating].format(g=genre)}."
    return _mr("give_opinion", slots), f"I think {name} is {_article(rating)} {rating} game."


def _confirm(rng: random.Random) -> tuple[str, str]:
    name = rng.choice(GAMES)
    if rng.random() < 0.5:
        year = str(rng.randint(1995, 2023))
        return _mr("confirm", {"name": name, "release_year": year}), f"Do you mean {name}, the game released in {year}?"
    developer = rng.choice(DEVELOPERS)
    return _mr("confirm", {"name": name, "developer": developer}), f"Do you mean {name}, the game made by {developer}?"


ACTS = (_inform, _inform, _recommend, _give_opinion, _confirm)


def make_one(rng: random.Random) -> tuple[str, str]:
    return rng.choice(ACTS)(rng)


def make_rows(rng: random.Random, n: int) -> list[dict]:
    return unique_rows(rng, n, make_one, NAME)
