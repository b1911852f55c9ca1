"""Write the two demo datasets in data/ (deterministic; re-running gives the same files).

- data/sentiment: a product review -> exactly `positive` or `negative`.
- data/topic-json: a news headline -> exactly `{"topic": "<sports|food|tech|weather>"}`.

The base model answers both in chatty prose, so exact match separates base and adapter.
Held-out examples use subjects the training split never shows.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "data"

PRODUCTS = [
    "blender",
    "laptop",
    "headphones",
    "backpack",
    "coffee maker",
    "phone case",
    "desk lamp",
    "running shoes",
    "keyboard",
    "water bottle",
    "tent",
    "vacuum cleaner",
    "camera",
    "jacket",
    "toaster",
    "monitor",
    "mattress",
    "umbrella",
    "guitar",
    "watch",
    "printer",
    "microwave",
    "bicycle",
    "scarf",
    "speaker",
    "tablet",
    "kettle",
    "sofa",
    "drill",
    "router",
    "suitcase",
    "mixer",
    "charger",
    "mouse",
    "pillow",
    "sunglasses",
]
POS = [
    "works perfectly",
    "exceeded my expectations",
    "is worth every penny",
    "feels sturdy and well made",
    "arrived early and works great",
    "is the best purchase I made this year",
    "does exactly what it promises",
    "is a joy to use every day",
    "has excellent build quality",
    "made my life easier",
]
NEG = [
    "broke after two days",
    "is a complete waste of money",
    "stopped working within a week",
    "feels cheap and flimsy",
    "arrived damaged and nobody helped",
    "is the worst purchase I made this year",
    "does not do what it promises",
    "is frustrating to use every day",
    "has terrible build quality",
    "made everything harder",
]
OPENERS = [
    "",
    "Honestly, ",
    "After a month, ",
    "I have to say ",
    "To be fair, ",
    "Bought it for my sister and ",
    "Well, ",
]
CLOSERS = [
    "",
    " Would buy again.",
    " Five stars.",
    " Never again.",
    " One star.",
    " Recommended to friends.",
    " Returning it.",
]

TOPICS = {
    "sports": [
        "{team} win the championship after a dramatic final",
        "{team} sign a new striker for a record fee",
        "Star player of {team} injured ahead of the derby",
        "{team} coach resigns after losing streak",
        "Fans celebrate as {team} reach the semifinals",
    ],
    "food": [
        "New bakery in {city} sells out of sourdough by noon",
        "Chefs in {city} revive a forgotten street dish",
        "{city} food festival draws record crowds",
        "Study finds {city} residents eat more vegetables",
        "Famous restaurant in {city} earns its third star",
    ],
    "tech": [
        "Startup in {city} unveils a faster battery for phones",
        "{city} launches free public wifi across downtown",
        "Chip maker opens a new factory near {city}",
        "Developers in {city} release an open source database",
        "{city} tests self-driving buses on main roads",
    ],
    "weather": [
        "Heavy snow expected in {city} this weekend",
        "Heatwave pushes {city} temperatures to a record high",
        "Storm warning issued for the coast near {city}",
        "Fog delays flights out of {city} airport",
        "Sunny skies return to {city} after weeks of rain",
    ],
}
TEAMS = [
    "the Rovers",
    "the Tigers",
    "City United",
    "the Hawks",
    "the Mariners",
    "Northern Stars",
    "the Falcons",
    "the Wolves",
    "Harbor FC",
    "the Comets",
    "the Giants",
    "Valley Rangers",
]
CITIES = [
    "Lisbon",
    "Denver",
    "Osaka",
    "Nairobi",
    "Toronto",
    "Krakow",
    "Lima",
    "Perth",
    "Dublin",
    "Austin",
    "Seoul",
    "Porto",
    "Oslo",
    "Quito",
    "Hanoi",
    "Leeds",
]


def sentiment(rng: random.Random, products: list[str], n: int) -> list[dict]:
    out = []
    for _ in range(n):
        label = rng.choice(["positive", "negative"])
        phrase = rng.choice(POS if label == "positive" else NEG)
        review = f"{rng.choice(OPENERS)}the {rng.choice(products)} {phrase}.{rng.choice(CLOSERS)}"
        review = review[0].upper() + review[1:]
        out.append(
            {
                "messages": [
                    {"role": "user", "content": f"Classify the sentiment of this review: {review}"},
                    {"role": "assistant", "content": label},
                ]
            }
        )
    return out


def topics(rng: random.Random, teams: list[str], cities: list[str], n: int) -> list[dict]:
    out = []
    for _ in range(n):
        topic = rng.choice(sorted(TOPICS))
        headline = rng.choice(TOPICS[topic]).format(team=rng.choice(teams), city=rng.choice(cities))
        headline = headline[0].upper() + headline[1:]
        out.append(
            {
                "messages": [
                    {"role": "user", "content": f"Which topic is this headline about? {headline}"},
                    {"role": "assistant", "content": json.dumps({"topic": topic})},
                ]
            }
        )
    return out


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    rng = random.Random(1234)
    write(ROOT / "sentiment" / "train.jsonl", sentiment(rng, PRODUCTS[:28], 200))
    write(ROOT / "sentiment" / "eval.jsonl", sentiment(rng, PRODUCTS[28:], 40))
    write(ROOT / "topic-json" / "train.jsonl", topics(rng, TEAMS[:9], CITIES[:12], 200))
    write(ROOT / "topic-json" / "eval.jsonl", topics(rng, TEAMS[9:], CITIES[12:], 40))


if __name__ == "__main__":
    main()
