"""Generate the `answer_format` instruction dataset shipped with qlora-toolkit (Apache-2.0, like the project).

The behaviour it teaches: answer every question with exactly one line, `ANSWER: <one word>`.
SmolLM2-135M-Instruct does not do that on its own (it answers in a sentence or more), so the
effect of a short fine-tune is plain to see. Every question and answer below was written for this
project from general knowledge (capitals, arithmetic, opposites, plurals, chemical symbols, ...);
nothing is copied from another dataset. The output is deterministic:

    python qconvert/data/make_answer_format.py   # rewrites answer_format_{train,eval}.jsonl here

The held-out split (`answer_format_eval.jsonl`, 15%) is drawn by a fixed seed and shares no
question with the training split.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Canada": "Ottawa", "Australia": "Canberra", "Ireland": "Dublin", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw", "Austria": "Vienna", "Greece": "Athens",
    "Hungary": "Budapest", "Peru": "Lima", "Chile": "Santiago", "Argentina": "Buenos Aires", "Cuba": "Havana",
    "Thailand": "Bangkok", "Vietnam": "Hanoi", "Iran": "Tehran", "Iraq": "Baghdad", "Turkey": "Ankara",
    "Belgium": "Brussels", "Netherlands": "Amsterdam", "Switzerland": "Bern", "Mexico": "Mexico City",
    "India": "New Delhi", "Nigeria": "Abuja", "Morocco": "Rabat", "Colombia": "Bogota", "Venezuela": "Caracas",
    "Ukraine": "Kyiv", "Romania": "Bucharest", "Czechia": "Prague", "Iceland": "Reykjavik", "Nepal": "Kathmandu",
    "Indonesia": "Jakarta", "Philippines": "Manila", "Ghana": "Accra", "Ethiopia": "Addis Ababa",
    "South Korea": "Seoul", "Bulgaria": "Sofia", "Serbia": "Belgrade", "Croatia": "Zagreb", "Lebanon": "Beirut",
}  # fmt: skip
OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "fast": "slow", "happy": "sad", "light": "dark", "open": "closed",
    "early": "late", "full": "empty", "hard": "soft", "high": "low", "long": "short", "old": "young", "rich": "poor",
    "strong": "weak", "wet": "dry", "win": "lose", "day": "night", "left": "right", "push": "pull", "buy": "sell",
    "true": "false", "inside": "outside", "heavy": "light", "loud": "quiet", "thick": "thin", "wide": "narrow",
    "clean": "dirty", "first": "last", "begin": "end", "above": "below", "friend": "enemy", "arrive": "leave",
    "accept": "refuse", "ancient": "modern", "brave": "cowardly", "cheap": "expensive", "deep": "shallow",
}  # fmt: skip
PLURALS = {
    "mouse": "mice", "child": "children", "foot": "feet", "tooth": "teeth", "goose": "geese", "man": "men",
    "woman": "women", "person": "people", "cactus": "cacti", "leaf": "leaves", "knife": "knives", "wolf": "wolves",
    "box": "boxes", "city": "cities", "baby": "babies", "sheep": "sheep", "fish": "fish", "ox": "oxen",
    "half": "halves", "potato": "potatoes", "hero": "heroes", "bus": "buses", "church": "churches",
    "life": "lives", "wife": "wives", "phenomenon": "phenomena", "crisis": "crises", "deer": "deer",
}  # fmt: skip
SYMBOLS = {
    "gold": "Au", "silver": "Ag", "iron": "Fe", "oxygen": "O", "hydrogen": "H", "carbon": "C", "nitrogen": "N",
    "sodium": "Na", "potassium": "K", "copper": "Cu", "lead": "Pb", "tin": "Sn", "helium": "He", "neon": "Ne",
    "calcium": "Ca", "zinc": "Zn", "mercury": "Hg", "sulfur": "S", "chlorine": "Cl", "uranium": "U",
}  # fmt: skip
YOUNG = {
    "dog": "puppy", "cat": "kitten", "cow": "calf", "horse": "foal", "sheep": "lamb", "goat": "kid", "frog": "tadpole",
    "swan": "cygnet", "bear": "cub", "kangaroo": "joey", "duck": "duckling", "goose": "gosling", "pig": "piglet",
    "deer": "fawn", "owl": "owlet", "eagle": "eaglet", "hen": "chick", "lion": "cub",
}  # fmt: skip
COLORS = {
    "the sky on a clear day": "blue", "fresh grass": "green", "a ripe banana": "yellow", "snow": "white",
    "coal": "black", "a ripe tomato": "red", "an orange": "orange", "a flamingo": "pink", "a raven": "black",
    "chocolate": "brown", "a lime": "green", "a polar bear": "white", "a school bus in the United States": "yellow",
    "blood": "red", "an eggplant": "purple", "the sun in a child's drawing": "yellow",
}  # fmt: skip
FACTS = {
    "Which planet is known as the Red Planet?": "Mars", "What is the largest planet in our solar system?": "Jupiter",
    "Which planet is closest to the sun?": "Mercury", "What gas do plants absorb from the air?": "CO2",
    "What is frozen water called?": "ice", "How many legs does a spider have?": "8",
    "How many days are in a week?": "7", "How many months are in a year?": "12", "How many sides does a hexagon have?": "6",
    "How many continents are there?": "7", "What is the largest ocean on Earth?": "Pacific",
    "Which animal is known as the king of the jungle?": "lion", "What do bees make?": "honey",
    "Which organ pumps blood through the body?": "heart", "What is the tallest animal?": "giraffe",
    "What is the fastest land animal?": "cheetah", "Which language is spoken in Brazil?": "Portuguese",
    "What is the currency of Japan?": "yen", "Who wrote Romeo and Juliet?": "Shakespeare",
    "What is the boiling point of water in Celsius?": "100", "How many hours are in a day?": "24",
    "What is the largest mammal?": "whale", "Which metal is liquid at room temperature?": "mercury",
    "What is the main ingredient of guacamole?": "avocado", "Which instrument has 88 keys?": "piano",
    "What is the hardest natural substance?": "diamond", "In which country are the pyramids of Giza?": "Egypt",
    "How many minutes are in an hour?": "60", "What color do you get by mixing blue and yellow?": "green",
    "Which bird is a symbol of peace?": "dove", "What is the longest river in Africa?": "Nile",
    "What do caterpillars turn into?": "butterflies", "Which season comes after winter?": "spring",
}  # fmt: skip
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]  # fmt: skip
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def questions(rng: random.Random) -> list[tuple[str, str]]:
    """(question, one-word answer) pairs; phrasings vary so the format, not one template, is learnt."""
    qa = []
    for country, city in CAPITALS.items():
        q = rng.choice(["What is the capital of {}?", "Which city is the capital of {}?", "Name the capital of {}.",
                        "What city is {}'s capital?"]).format(country)  # fmt: skip
        qa.append((q, city.replace(" ", "")))  # one word: multi-word capitals are written together
    for word, opposite in OPPOSITES.items():
        q = rng.choice(["What is the opposite of {}?", "Give the antonym of '{}'.", "What word means the opposite of {}?"])
        qa.append((q.format(word), opposite))
    for word, plural in PLURALS.items():
        q = rng.choice(["What is the plural of {}?", "How do you write more than one {}?", "Plural of '{}'?"])
        qa.append((q.format(word), plural))
    for element, symbol in SYMBOLS.items():
        q = rng.choice(["What is the chemical symbol for {}?", "Which element symbol stands for {}?"])
        qa.append((q.format(element), symbol))
    for animal, young in YOUNG.items():
        q = rng.choice(["What do you call a baby {}?", "What is a young {} called?"])
        qa.append((q.format(animal), young))
    for thing, color in COLORS.items():
        qa.append((rng.choice(["What color is {}?", "Which color is {} usually?"]).format(thing), color))
    qa += list(FACTS.items())
    for i, day in enumerate(DAYS):
        qa.append((f"Which day comes after {day}?", DAYS[(i + 1) % 7]))
        qa.append((f"Which day comes before {day}?", DAYS[(i - 1) % 7]))
    for i, month in enumerate(MONTHS):
        qa.append((f"Which month comes after {month}?", MONTHS[(i + 1) % 12]))
    for _ in range(70):
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        op = rng.choice(["plus", "minus", "times"])
        value = {"plus": a + b, "minus": a - b, "times": a * b}[op]
        qa.append((rng.choice(["What is {} {} {}?", "Compute {} {} {}.", "How much is {} {} {}?"]).format(a, op, b),
                   str(value)))  # fmt: skip
    for n in range(1, 11):
        qa.append((f"Write the number {n} as a word.", NUMBER_WORDS[n]))
    words = ["banana", "elephant", "guitar", "window", "orange", "pencil", "river", "mountain", "yellow", "kitchen"]
    for w in words:
        qa.append((f"What is the first letter of the word '{w}'?", w[0]))
        qa.append((f"How many letters are in the word '{w}'?", str(len(w))))
    return qa


def main(out_dir: Path = Path(__file__).parent, eval_fraction: float = 0.15, seed: int = 0) -> None:
    rng = random.Random(seed)
    qa = questions(rng)
    assert len({q for q, _ in qa}) == len(qa), "duplicate question"
    assert all(" " not in a for _, a in qa), "answers are one word"
    rng.shuffle(qa)
    n_eval = round(len(qa) * eval_fraction)
    for name, part in (("answer_format_eval.jsonl", qa[:n_eval]), ("answer_format_train.jsonl", qa[n_eval:])):
        with open(out_dir / name, "w") as f:
            for q, a in part:
                msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": f"ANSWER: {a}"}]
                f.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
        print(f"{out_dir / name}: {len(part)} examples")


if __name__ == "__main__":
    main()
