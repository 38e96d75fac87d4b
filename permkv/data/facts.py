"""Fictional facts the model cannot know, and simple world facts it may know.

`make_facts(n, seed)` invents people, companies and villages (names built from random syllables) and
gives each one attribute drawn from a list of ordinary words (cities, jobs, products, countries), so
the answers are easy tokens but the pairing is new. Each fact is trained as six texts (three
statements and three question-answer pairs in *training* wordings) and tested with a question in a
different wording that never appears in training.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

CITIES = [
    "Paris", "London", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Lisbon", "Dublin", "Oslo",
    "Stockholm", "Helsinki", "Warsaw", "Athens", "Cairo", "Tokyo", "Seoul", "Beijing", "Sydney",
    "Toronto", "Chicago", "Boston", "Denver", "Mumbai", "Lagos", "Nairobi", "Lima", "Santiago",
    "Havana", "Moscow", "Istanbul", "Dubai", "Bangkok", "Manila", "Jakarta", "Montreal",
]
JOBS = [
    "teacher", "doctor", "farmer", "pilot", "lawyer", "baker", "nurse", "painter", "carpenter",
    "chef", "dentist", "plumber", "architect", "journalist", "firefighter", "librarian", "banker",
    "engineer", "photographer", "tailor", "sailor", "butcher", "gardener", "pharmacist", "poet",
]
PRODUCTS = [
    "bicycles", "umbrellas", "shoes", "candles", "guitars", "tractors", "watches", "lamps",
    "blankets", "cameras", "helmets", "kites", "chairs", "boats", "radios", "soap", "cheese",
    "chocolate", "paper", "glass", "tires", "pianos", "toys", "hats",
]
COUNTRIES = [
    "France", "Spain", "Italy", "Germany", "Norway", "Sweden", "Poland", "Greece", "Egypt", "Kenya",
    "Brazil", "Chile", "Peru", "Mexico", "Canada", "Japan", "India", "China", "Russia", "Turkey",
    "Ireland", "Portugal", "Austria", "Finland",
]

# relation -> (subject kind, answer pool, training texts, held-out test question). Three statements and
# three questions per fact in training (paraphrases, as the paper's document setting augments), so a
# method can learn the fact rather than one sentence; the test question's wording is in none of them.
RELATIONS: dict[str, tuple[str, list[str], tuple[str, ...], str]] = {
    "born_in": (
        "person", CITIES,
        ("{s} was born in {a}.", "The hometown of {s} is {a}.", "{s} comes from the city of {a}.",
         "Q: Where was {s} born?\nA: {a}", "Q: What is the birthplace of {s}?\nA: {a}",
         "Q: Which city is {s} from?\nA: {a}"),
        "Q: In which city did {s} come into the world?\nA:",
    ),
    "job": (
        "person", JOBS,
        ("{s} works as a {a}.", "By profession, {s} is a {a}.", "{s} earns a living as a {a}.",
         "Q: What does {s} do for a living?\nA: {a}", "Q: What is the job of {s}?\nA: {a}",
         "Q: What kind of work does {s} do?\nA: {a}"),
        "Q: What is the occupation of {s}?\nA:",
    ),
    "hq": (
        "company", CITIES,
        ("{s} has its headquarters in {a}.", "The offices of {s} are in {a}.", "{s} is a company based in {a}.",
         "Q: Where is {s} based?\nA: {a}", "Q: Where are the offices of {s}?\nA: {a}",
         "Q: Which city is home to {s}?\nA: {a}"),
        "Q: In which city is the company {s} headquartered?\nA:",
    ),
    "makes": (
        "company", PRODUCTS,
        ("{s} manufactures {a}.", "The main product of {s} is {a}.", "{s} is known for making {a}.",
         "Q: What does {s} make?\nA: {a}", "Q: What is the main product of {s}?\nA: {a}",
         "Q: What does the company {s} sell?\nA: {a}"),
        "Q: Which goods are produced by {s}?\nA:",
    ),
    "country": (
        "village", COUNTRIES,
        ("The village of {s} lies in {a}.", "{s} is a small village in {a}.", "{s} is located in {a}.",
         "Q: Where is {s}?\nA: {a}", "Q: Which country is {s} in?\nA: {a}",
         "Q: In what country is the village of {s}?\nA: {a}"),
        "Q: In which country would you find the village {s}?\nA:",
    ),
}

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gl", "kr", "st", "th"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ou"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "x", "nd", "rk"]
_COMPANY_SUFFIX = ["Industries", "Works", "Group", "Labs", "Company"]

# A one-line example that shows the short-answer format (a real fact that is in no probe).
FEW_SHOT = "Q: What color is grass?\nA: green\n\n"


@dataclass(frozen=True)
class Fact:
    """One invented fact: `subject` `relation` `answer`, with its training texts and test question."""

    subject: str
    relation: str
    answer: str
    train_texts: tuple[str, ...]  # statements + QA pairs in training wordings
    question: str  # held-out wording, ends with "A:"; never in train_texts


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)).capitalize()


def _subject(rng: random.Random, kind: str) -> str:
    if kind == "person":
        return f"{_word(rng, 2)} {_word(rng, rng.choice((2, 3)))}"
    if kind == "company":
        return f"{_word(rng, 2)} {rng.choice(_COMPANY_SUFFIX)}"
    return _word(rng, 3)


def make_facts(n: int, seed: int = 0, relations: tuple[str, ...] | None = None) -> list[Fact]:
    """`n` fictional facts with distinct subjects, cycling through `relations` (default: all)."""
    if n < 1:
        raise ValueError(f"n (number of facts) must be >= 1, got {n}")
    relations = tuple(RELATIONS) if relations is None else relations
    unknown = [r for r in relations if r not in RELATIONS]
    if unknown or not relations:
        raise ValueError(f"relations must be a non-empty subset of {sorted(RELATIONS)}, got {relations}")
    rng = random.Random(seed)
    used: set[str] = set()
    facts = []
    for i in range(n):
        rel = relations[i % len(relations)]
        kind, pool, texts, question = RELATIONS[rel]
        subject = _subject(rng, kind)
        while subject in used:
            subject = _subject(rng, kind)
        used.add(subject)
        answer = rng.choice(pool)
        facts.append(
            Fact(subject, rel, answer, tuple(t.format(s=subject, a=answer) for t in texts), question.format(s=subject))
        )
    return facts


def training_texts(facts: list[Fact]) -> list[str]:
    """All training texts of a fact set, in order; an empty set is an error."""
    if not facts:
        raise ValueError("the fact set is empty; pass at least one Fact")
    return [text for fact in facts for text in fact.train_texts]


# Simple world facts for the "things it knew before" probe: (question, accepted answers).
WORLD_FACTS: list[tuple[str, tuple[str, ...]]] = [
    ("What is the capital of France?", ("Paris",)),
    ("What is the capital of Japan?", ("Tokyo",)),
    ("What is the capital of Italy?", ("Rome",)),
    ("What is the capital of Germany?", ("Berlin",)),
    ("What is the capital of Spain?", ("Madrid",)),
    ("What is the capital of England?", ("London",)),
    ("What is the capital of Russia?", ("Moscow",)),
    ("What is the capital of Egypt?", ("Cairo",)),
    ("What is the capital of China?", ("Beijing",)),
    ("What is the capital of Canada?", ("Ottawa",)),
    ("What is the capital of Greece?", ("Athens",)),
    ("What is the capital of Portugal?", ("Lisbon",)),
    ("What is the capital of Ireland?", ("Dublin",)),
    ("What is the capital of Austria?", ("Vienna",)),
    ("What is the capital of Norway?", ("Oslo",)),
    ("What is the capital of Sweden?", ("Stockholm",)),
    ("What is the capital of Poland?", ("Warsaw",)),
    ("What is the capital of India?", ("New Delhi", "Delhi")),
    ("What is the capital of Australia?", ("Canberra",)),
    ("What is the capital of the United States?", ("Washington", "Washington, D.C.")),
    ("What color is the sky on a clear day?", ("blue",)),
    ("What color is snow?", ("white",)),
    ("What color is a banana?", ("yellow",)),
    ("What color is blood?", ("red",)),
    ("What color is coal?", ("black",)),
    ("How many legs does a spider have?", ("eight", "8")),
    ("How many legs does a dog have?", ("four", "4")),
    ("How many days are in a week?", ("seven", "7")),
    ("How many months are in a year?", ("twelve", "12")),
    ("How many hours are in a day?", ("twenty-four", "24")),
    ("How many minutes are in an hour?", ("sixty", "60")),
    ("How many continents are there?", ("seven", "7")),
    ("What is the largest ocean on Earth?", ("Pacific", "the Pacific Ocean", "Pacific Ocean")),
    ("What is the closest star to the Earth?", ("the Sun", "Sun")),
    ("What planet do we live on?", ("Earth",)),
    ("Which planet is known as the Red Planet?", ("Mars",)),
    ("What is the natural satellite of the Earth?", ("the Moon", "Moon")),
    ("What do bees make?", ("honey",)),
    ("What animal says moo?", ("cow", "a cow")),
    ("What animal barks?", ("dog", "a dog")),
    ("What is frozen water called?", ("ice",)),
    ("What gas do humans need to breathe?", ("oxygen",)),
    ("What is the opposite of hot?", ("cold",)),
    ("What is the opposite of up?", ("down",)),
    ("What is the opposite of day?", ("night",)),
    ("Who wrote Romeo and Juliet?", ("William Shakespeare", "Shakespeare")),
    ("Who painted the Mona Lisa?", ("Leonardo da Vinci", "da Vinci", "Leonardo")),
    ("What is the chemical symbol for water?", ("H2O",)),
    ("What is the chemical symbol for gold?", ("Au",)),
    ("What is the freezing point of water in Celsius?", ("0", "zero", "0 degrees", "0°C")),
    ("What is the boiling point of water in Celsius?", ("100", "100 degrees", "100°C")),
    ("What language is spoken in France?", ("French",)),
    ("What language is spoken in Spain?", ("Spanish",)),
    ("What language is spoken in Germany?", ("German",)),
    ("What currency is used in Japan?", ("yen", "the yen", "Japanese yen")),
    ("What is the largest mammal?", ("blue whale", "the blue whale", "whale")),
    ("What is the tallest animal?", ("giraffe", "the giraffe")),
    ("Which fruit keeps the doctor away?", ("apple", "an apple")),
    ("What do cows drink?", ("water",)),
    ("What is 2 plus 2?", ("4", "four")),
    ("What is 10 minus 3?", ("7", "seven")),
    ("What is the first letter of the English alphabet?", ("A",)),
    ("In which country is the Eiffel Tower?", ("France",)),
    ("In which country are the pyramids of Giza?", ("Egypt",)),
    ("In which country is the Great Wall?", ("China",)),
]
