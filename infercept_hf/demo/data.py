"""Synthetic tool-use dialogues for the demo model, one generator per augmentation type.

A dialogue is a list of `(text, trained)` pieces: the prompt and the tool answers are
context (`trained=False`), the model's own tool calls and reply are what it learns to
write. Answers come from the real tool functions, so training text and demo runs agree
character for character, with one deliberate exception: in `_SWAPPED_ANSWER_SHARE` of
the QA dialogues the lookup's answer is replaced by a made-up name. Otherwise the model
memorises the 46-country knowledge base and never learns to copy the tool's answer,
which is what it needs for facts it has not seen (a model trained without the swap got
15 of 36 held-out facts right). The bundled checkpoint, trained with it, also scores
15 of 36, but its misses are copies with a wrong first letter ("Sadrid" for Madrid):
`python -m infercept_hf.demo.evaluate --failures` shows them.

Held-out evaluation is disjoint from training by construction: an arithmetic question
whose `(a, op, b)` hashes into `_HELDOUT_BUCKET` and a QA fact whose `(relation, country)`
does are never generated for training, whatever the seed.
"""
from __future__ import annotations

import hashlib
import random
import string
from collections.abc import Callable
from dataclasses import dataclass

from .chat_format import EOS, call_text, demo_prompt, wrap_answer
from .game import ALL_ITEMS, ROOMS, TextGame, next_action
from .knowledge import COUNTRIES, RELATIONS, lookup
from .tools import CHAT_INTENTS, calculate, image_file, image_name, speech_file, speech_name

Piece = tuple[str, bool]

_HELDOUT_BUCKETS = 8
_HELDOUT_BUCKET = 0
_OPERATORS = ("+", "-", "*", "/")
_OP_WORDS = {"+": ("plus",), "-": ("minus",), "*": ("times", "multiplied by"), "/": ("divided by", "over")}
_SYMBOL_TEMPLATES = ("What is {a} {s} {b}?", "Compute {a}{s}{b}", "Calculate {a} {s} {b}.", "{a} {s} {b} = ?",
                     "What's {a}{s}{b}?", "Solve {a} {s} {b}", "Evaluate {a} {s} {b}, please.")
_WORD_TEMPLATES = ("how much is {a} {w} {b}", "What is {a} {w} {b}?", "Tell me {a} {w} {b}.")
_VERB_TEMPLATES = {
    "+": ("Add {a} and {b}.", "What is the sum of {a} and {b}?"),
    "-": ("Subtract {b} from {a}.", "What is the difference between {a} and {b}?"),
    "*": ("Multiply {a} by {b}.", "What is the product of {a} and {b}?", "What is {a} x {b}?"),
    "/": ("Divide {a} by {b}.", "What is the quotient of {a} and {b}?"),
}
# Two calls each: (question, first call, how the second call uses the first result).
_WORD_PROBLEMS = (
    ("A shop has {a} boxes with {b} pens each. It sells {c} pens. How many pens are left?", "{a}*{b}", "{r}-{c}"),
    ("A farm has {a} rows of {b} trees. {c} more trees are planted. How many trees are there now?",
     "{a}*{b}", "{r}+{c}"),
    ("Anna earns {a} dollars a week for {b} weeks and spends {c} dollars. How much is left?", "{a}*{b}", "{r}-{c}"),
    ("A train has {c} people. At each of {a} stops {b} people get on. How many people are on the train?",
     "{a}*{b}", "{c}+{r}"),
)
_QA_TEMPLATES = {
    "capital": ("What is the capital of {c}?", "Which city is the capital of {c}?", "Name the capital of {c}.",
                "capital of {c}?", "Tell me the capital city of {c}."),
    "currency": ("What currency is used in {c}?", "What is the currency of {c}?", "Which money do people use in {c}?",
                 "currency of {c}?"),
    "continent": ("On which continent is {c}?", "What continent is {c} in?", "Which continent is {c} part of?",
                  "continent of {c}?"),
}
_SWAPPED_ANSWER_SHARE = 0.5
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_UNKNOWN_PLACES = ("Atlantis", "Narnia", "Wakanda", "Elbonia", "Freedonia", "Genovia", "Latveria")
_GAME_TEMPLATES = ("Fetch the {i}.", "Play the game: find the {i}.", "Go get the {i} in the house.",
                   "Bring me the {i}.", "Can you find the {i}?")
_ADJECTIVES = ("red", "blue", "small", "happy", "old", "green", "sleepy", "shiny", "giant", "tiny", "purple")
_NOUNS = ("cat", "dog", "car", "house", "tree", "robot", "bird", "boat", "dragon", "castle", "horse", "flower")
_PLACES = ("", " on a sofa", " in the snow", " at night", " on the moon", " by the sea", " in a forest")
_IMAGE_TEMPLATES = ("Draw {s}.", "Generate an image of {s}.", "Make a picture of {s}.", "Paint {s}.",
                    "Show me {s}.", "Can you draw {s}?")
_SUBJECTS = ("the cat", "my friend", "the teacher", "our team", "the robot", "dinner", "the train", "grandma")
_VERBS = ("is", "was", "will be", "seems", "is not")
_STATES = ("happy", "late", "ready", "here", "asleep", "on time", "very hungry", "at home")
_ENDINGS = ("", " today", " again", " now", " tonight")
_TTS_TEMPLATES = ("Read this aloud: {t}", "Say '{t}' out loud.", "Turn this into speech: {t}",
                  "Convert to audio: {t}", "Speak: {t}")
_ECHO_TEMPLATES = ("Repeat after me: {s}", "Say back: {s}", "Echo {s}", "Copy this: {s}")
_ECHO_ALPHABET = "0123456789" * 3 + "abcdefghijklmnopqrstuvwxyz"
_CHAT_OPENERS = {
    "trip": ("I want to book a trip.", "Book me a trip, please.", "Plan a holiday for me."),
    "meal": ("Suggest a dinner.", "What should I eat tonight?", "Recommend a meal."),
    "reminder": ("Set a reminder.", "Remind me of something later.", "I need a reminder."),
    "name": ("Hi there!", "Hello!", "Good morning!"),
}


@dataclass(frozen=True)
class ArithmeticItem:
    """One single-operation question with the call the model should make and the result."""

    question: str
    expression: str
    result: str


def _bucket(*parts: object) -> int:
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return digest[0] % _HELDOUT_BUCKETS


def is_heldout(*parts: object) -> bool:
    """True for the evaluation share of arithmetic tuples and QA facts."""
    return _bucket(*parts) == _HELDOUT_BUCKET


def split_expression(expression: str) -> tuple[int, str, int]:
    """`"123*45"` -> `(123, "*", 45)`: the tuple the held-out split hashes."""
    for op in _OPERATORS:
        left, sep, right = expression.partition(op)
        if sep and left.isdigit() and right.isdigit():
            return int(left), op, int(right)
    raise ValueError(f"not a single operation on two positive integers: {expression!r}")


def _operand(rng: random.Random) -> int:
    digits = rng.randint(2, 4)
    return rng.randint(10 ** (digits - 1), 10**digits - 1)


def _operands(rng: random.Random, op: str) -> tuple[int, int]:
    if op != "/":
        return _operand(rng), _operand(rng)
    divisor = rng.randint(10, 99) if rng.random() < 0.7 else rng.randint(100, 999)
    quotient = rng.randint(max(2, -(-10 // divisor)), 9999 // divisor)
    return divisor * quotient, divisor


def _phrase(rng: random.Random, a: int, op: str, b: int) -> str:
    style = rng.random()
    if style < 0.45:
        symbol = "x" if op == "*" and rng.random() < 0.2 else op
        question = rng.choice(_SYMBOL_TEMPLATES).format(a=a, s=symbol, b=b)
    elif style < 0.75:
        question = rng.choice(_WORD_TEMPLATES).format(a=a, w=rng.choice(_OP_WORDS[op]), b=b)
    else:
        question = rng.choice(_VERB_TEMPLATES[op]).format(a=a, b=b)
    return question[0].lower() + question[1:] if rng.random() < 0.15 else question


def arithmetic_item(rng: random.Random, heldout: bool) -> ArithmeticItem:
    """A random single-operation question from the training share or the held-out share."""
    while True:
        op = rng.choice(_OPERATORS)
        a, b = _operands(rng, op)
        if is_heldout(a, op, b) == heldout:
            expression = f"{a}{op}{b}"
            return ArithmeticItem(_phrase(rng, a, op, b), expression, calculate(expression))


def _calc_turn(expression: str) -> tuple[list[Piece], str]:
    result = calculate(expression)
    return [(call_text("calculator", expression), True), (wrap_answer(result), False)], result


def arithmetic(rng: random.Random) -> list[Piece]:
    item = arithmetic_item(rng, heldout=False)
    pieces, result = _calc_turn(item.expression)
    return [(demo_prompt(item.question), False), *pieces, (f"The answer is {result}.{EOS}", True)]


def word_problem(rng: random.Random) -> list[Piece]:
    template, first, second = rng.choice(_WORD_PROBLEMS)
    while True:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        c = rng.randint(10, a * b - 1)
        calls = [first.format(a=a, b=b), second.format(r=a * b, c=c)]
        if not any(is_heldout(*split_expression(call)) for call in calls):
            break
    first_pieces, _ = _calc_turn(calls[0])
    second_pieces, result = _calc_turn(calls[1])
    prompt = demo_prompt(template.format(a=a, b=b, c=c))
    return [(prompt, False), *first_pieces, *second_pieces, (f"The answer is {result}.{EOS}", True)]


def qa_facts(heldout: bool) -> list[tuple[str, str]]:
    """(relation, country) pairs of the training or the held-out share."""
    return [(rel, c) for c in COUNTRIES for rel in RELATIONS if is_heldout(rel, c) == heldout]


def qa_question(rng: random.Random, relation: str, country: str) -> str:
    return rng.choice(_QA_TEMPLATES[relation]).format(c=country)


def _made_up_name(rng: random.Random, relation: str) -> str:
    """Any first letter: the first character is the one a model is most tempted to guess."""
    name = rng.choice(string.ascii_lowercase) + "".join(
        rng.choice(_VOWELS) + rng.choice(_CONSONANTS) for _ in range(rng.randint(1, 3))
    )
    return name if relation == "currency" else name.capitalize()


def _lookup_turn(relation: str, country: str, swap: random.Random | None = None) -> tuple[list[Piece], str]:
    """The lookup call and its answer; with `swap`, a made-up answer the reply must copy."""
    query = f"{relation} of {country}"
    answer = _made_up_name(swap, relation) if swap is not None else lookup(query)
    return [(call_text("lookup", query), True), (wrap_answer(answer), False)], answer


def question_answering(rng: random.Random, facts: list[tuple[str, str]]) -> list[Piece]:
    if rng.random() < 0.08:
        relation, country = rng.choice(RELATIONS), rng.choice(_UNKNOWN_PLACES)
        pieces, _ = _lookup_turn(relation, country)
        reply = f"Sorry, I could not find the {relation} of {country}."
        return [(demo_prompt(qa_question(rng, relation, country)), False), *pieces, (reply + EOS, True)]
    relation, country = rng.choice(facts)
    swap = rng if rng.random() < _SWAPPED_ANSWER_SHARE else None
    if rng.random() < 0.25 and (other := rng.choice(RELATIONS)) != relation and (other, country) in facts:
        first, r1 = _lookup_turn(relation, country, swap)
        second, r2 = _lookup_turn(other, country, swap)
        question = f"What are the {relation} and the {other} of {country}?"
        reply = f"The {relation} of {country} is {r1} and the {other} is {r2}."
        return [(demo_prompt(question), False), *first, *second, (reply + EOS, True)]
    pieces, answer = _lookup_turn(relation, country, swap)
    reply = f"The {relation} of {country} is {answer}."
    return [(demo_prompt(qa_question(rng, relation, country)), False), *pieces, (reply + EOS, True)]


def game_question(rng: random.Random, item: str) -> str:
    return rng.choice(_GAME_TEMPLATES).format(i=item)


def game_episode(rng: random.Random) -> list[Piece]:
    """A shortest-path episode for a random item from a random start room."""
    item = rng.choice(ALL_ITEMS)
    game = TextGame(rng.choice(ROOMS), goal=item)
    pieces: list[Piece] = [(demo_prompt(game_question(rng, item)), False),
                           (call_text("game", f"start {item}"), True), (wrap_answer(game.describe()), False)]
    while item not in game.inventory:
        action = next_action(game.room, item)
        pieces += [(call_text("game", action), True), (wrap_answer(game.step(action)), False)]
    return pieces + [(f"I got the {item}.{EOS}", True)]


def _subject(rng: random.Random) -> str:
    return f"a {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}{rng.choice(_PLACES)}"


def image_generation(rng: random.Random) -> list[Piece]:
    subjects = [_subject(rng)] if rng.random() < 0.8 else [_subject(rng), _subject(rng)]
    if len(subjects) == 1:
        question = rng.choice(_IMAGE_TEMPLATES).format(s=subjects[0])
    else:
        question = f"Draw two pictures: {subjects[0]}; {subjects[1]}."
    pieces: list[Piece] = [(demo_prompt(question), False)]
    for subject in subjects:
        pieces += [(call_text("image", subject), True), (wrap_answer(image_file(subject)), False)]
    files = [image_name(subject) for subject in subjects]
    lead = "Here is your image" if len(files) == 1 else "Here are your images"
    return pieces + [(f"{lead}: {' and '.join(files)}.{EOS}", True)]


def text_to_speech(rng: random.Random) -> list[Piece]:
    text = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_STATES)}{rng.choice(_ENDINGS)}"
    reply = f"Here is the audio: {speech_name(text)}.{EOS}"
    question = rng.choice(_TTS_TEMPLATES).format(t=text)
    return [(demo_prompt(question), False), (call_text("tts", text), True), (wrap_answer(speech_file(text)), False),
            (reply, True)]


def chat(rng: random.Random) -> list[Piece]:
    intent = rng.choice(tuple(CHAT_INTENTS))
    asked, replies, template = CHAT_INTENTS[intent]
    user_reply = rng.choice(replies)
    return [(demo_prompt(rng.choice(_CHAT_OPENERS[intent])), False), (call_text("chat", asked), True),
            (wrap_answer(user_reply), False), (template.format(user_reply) + EOS, True)]


def echo(rng: random.Random) -> list[Piece]:
    """No tool: repeat random digits and letters. Dense copying makes the copy circuit form early,
    which the tool dialogues need to carry operands and results over exactly."""
    groups = [
        "".join(rng.choice(_ECHO_ALPHABET) for _ in range(rng.randint(2, 6))) for _ in range(rng.randint(1, 3))
    ]
    text = " ".join(groups)
    return [(demo_prompt(rng.choice(_ECHO_TEMPLATES).format(s=text)), False), (text + EOS, True)]


def training_mix() -> list[tuple[float, Callable[[random.Random], list[Piece]]]]:
    """(weight, generator) per dialogue kind; arithmetic dominates because its gate is strictest."""
    facts = qa_facts(heldout=False)
    return [
        (0.36, arithmetic),
        (0.08, word_problem),
        (0.14, echo),
        (0.14, lambda rng: question_answering(rng, facts)),
        (0.10, game_episode),
        (0.06, image_generation),
        (0.06, text_to_speech),
        (0.06, chat),
    ]


def dialogues(seed: int, n: int, copy_only: bool = False) -> list[list[Piece]]:
    """`n` training dialogues drawn from the mix (or only `echo` ones), reproducibly from `seed`."""
    rng = random.Random(seed)
    mix = [(1.0, echo)] if copy_only else training_mix()
    weights = [w for w, _ in mix]
    return [rng.choices(mix, weights)[0][1](rng) for _ in range(n)]
