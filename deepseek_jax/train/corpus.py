"""The embedded corpus: a small generated world, so training needs no network and no dataset.

Documents are English text about a fixed cast of people (each with a home town, a pet, a
favourite colour, a job and an age that never change), short stories about them, question /
answer pairs about those facts, correct arithmetic, and counting sequences. A falling loss means
the model is learning spelling, grammar, the world's facts (which repeat across documents) and
arithmetic; a sample from a trained model reads like the corpus. Fully deterministic in the seed;
generated in about a second.
"""

from __future__ import annotations

import random

NAMES = [("Mia", "she"), ("Leo", "he"), ("Ava", "she"), ("Noah", "he"), ("Zoe", "she"),
         ("Liam", "he"), ("Ivy", "she"), ("Owen", "he"), ("Ruby", "she"), ("Finn", "he"),
         ("Nora", "she"), ("Eli", "he"), ("Lily", "she"), ("Jack", "he"), ("Emma", "she"),
         ("Sam", "he"), ("Cleo", "she"), ("Max", "he"), ("Tess", "she"), ("Hugo", "he")]
TOWNS = ["Oakridge", "Riverton", "Maple Hill", "Stonebrook", "Clearwater", "Pine Valley",
         "Sunfield", "Fox Hollow"]
PETS = [("cat", "meowed"), ("dog", "barked"), ("parrot", "sang"), ("rabbit", "hopped"),
        ("turtle", "slept"), ("horse", "neighed")]
PET_NAMES = ["Pip", "Bo", "Max", "Luna", "Coco", "Biscuit", "Rex", "Daisy", "Pepper", "Milo"]
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"]
JOBS = [("baker", "baked bread"), ("teacher", "taught a class"), ("farmer", "fed the cows"),
        ("doctor", "helped a patient"), ("painter", "painted a wall"),
        ("pilot", "flew a plane"), ("chef", "cooked soup"), ("builder", "built a fence")]
PLACES = ["the park", "the market", "the river", "the library", "the beach", "the hill",
          "the garden", "the old bridge"]
THINGS = ["a kite", "a ball", "a book", "an apple", "a hat", "a map", "a lamp", "a basket"]
WEATHER = ["sunny", "rainy", "windy", "cold", "warm", "cloudy"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten"]


def _world(rng: random.Random) -> list[dict]:
  people = []
  for name, pronoun in NAMES:
    pet, sound = rng.choice(PETS)
    job, work = rng.choice(JOBS)
    people.append(dict(name=name, he=pronoun, his="her" if pronoun == "she" else "his",
                       town=rng.choice(TOWNS), pet=pet, sound=sound, pet_name=rng.choice(PET_NAMES),
                       color=rng.choice(COLORS), job=job, work=work, age=rng.randint(8, 70)))
  return people


def _profile(p: dict, rng: random.Random) -> str:
  lines = [f"{p['name']} lives in {p['town']}.", f"{p['name']} is {p['age']} years old.",
           f"{p['He']} works as a {p['job']}.", f"{p['name']} has a {p['pet']} named {p['pet_name']}.",
           f"{p['His']} favourite colour is {p['color']}."]
  rng.shuffle(lines)
  return " ".join(lines)


def _story(p: dict, friend: dict, rng: random.Random) -> str:
  place, thing, weather = rng.choice(PLACES), rng.choice(THINGS), rng.choice(WEATHER)
  return (f"It was a {weather} day in {p['town']}. {p['name']} walked to {place} with "
          f"{p['his']} {p['pet']}, {p['pet_name']}. There {p['he']} met {friend['name']}, who "
          f"carried {thing}. The {p['pet']} {p['sound']}. {friend['name']} said, \"Hello, "
          f"{p['name']}!\" Later {p['name']} went home, and the next day {p['he']} {p['work']}.")


def _questions(p: dict, rng: random.Random) -> str:
  qa = [(f"Where does {p['name']} live?", f"{p['name']} lives in {p['town']}."),
        (f"What pet does {p['name']} have?", f"{p['name']} has a {p['pet']}."),
        (f"What is the name of {p['name']}'s {p['pet']}?", f"It is called {p['pet_name']}."),
        (f"How old is {p['name']}?", f"{p['name']} is {p['age']} years old."),
        (f"What is {p['name']}'s job?", f"{p['name']} is a {p['job']}."),
        (f"What colour does {p['name']} like?", f"{p['name']} likes {p['color']}.")]
  rng.shuffle(qa)
  return "\n".join(f"Q: {q}\nA: {a}" for q, a in qa[:rng.randint(2, 4)])


def _arithmetic(rng: random.Random) -> str:
  lines = []
  for _ in range(rng.randint(3, 6)):
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    op = rng.choice("+-*")
    if op == "-" and b > a:
      a, b = b, a
    if op == "*":
      a, b = rng.randint(0, 12), rng.randint(0, 12)
    result = a + b if op == "+" else a - b if op == "-" else a * b
    lines.append(f"{a} {op} {b} = {result}")
  return "\n".join(lines)


def _counting(rng: random.Random) -> str:
  if rng.random() < 0.5:
    step, start = rng.randint(1, 9), rng.randint(0, 20)
    return f"Counting by {step} from {start}: " + ", ".join(str(start + step * i) for i in range(8)) + "."
  n = rng.randint(3, 10)
  return "Counting in words: " + ", ".join(NUMBER_WORDS[1:n + 1]) + "."


def world(seed: int = 0) -> list[dict]:
  """The cast of the corpus of ``seed``: one dict per person (name, he/his/He/His, town, pet,
  sound, pet_name, color, job, work, age); the facts every document states."""
  people = _world(random.Random(seed))
  for p in people:
    p["He"], p["His"] = p["he"].capitalize(), p["his"].capitalize()
  return people


def generate_corpus(n_documents: int = 20000, seed: int = 0) -> list[str]:
  """``n_documents`` documents of the generated world (world facts fixed by ``seed``)."""
  rng = random.Random(seed)
  people = world(seed)
  docs = []
  for _ in range(n_documents):
    kind = rng.random()
    p = rng.choice(people)
    if kind < 0.3:
      docs.append(_story(p, rng.choice([q for q in people if q is not p]), rng))
    elif kind < 0.5:
      docs.append(_profile(p, rng))
    elif kind < 0.75:
      docs.append(_questions(p, rng))
    elif kind < 0.92:
      docs.append(_arithmetic(rng))
    else:
      docs.append(_counting(rng))
  return docs
