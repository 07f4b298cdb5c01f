"""The small knowledge base the demo's lookup tool answers from (the QA augmentation).

Facts are keyed `"<relation> of <country>"`, the exact query text the model learns to
write, so a lookup is a dictionary hit after light normalisation. ASCII only: the
tokenizer is character-level over printable ASCII.
"""
from __future__ import annotations

# country: (capital, currency, continent)
COUNTRIES: dict[str, tuple[str, str, str]] = {
    "France": ("Paris", "euro", "Europe"),
    "Germany": ("Berlin", "euro", "Europe"),
    "Italy": ("Rome", "euro", "Europe"),
    "Spain": ("Madrid", "euro", "Europe"),
    "Portugal": ("Lisbon", "euro", "Europe"),
    "Greece": ("Athens", "euro", "Europe"),
    "Ireland": ("Dublin", "euro", "Europe"),
    "Austria": ("Vienna", "euro", "Europe"),
    "Finland": ("Helsinki", "euro", "Europe"),
    "Netherlands": ("Amsterdam", "euro", "Europe"),
    "Poland": ("Warsaw", "zloty", "Europe"),
    "Sweden": ("Stockholm", "krona", "Europe"),
    "Norway": ("Oslo", "krone", "Europe"),
    "Denmark": ("Copenhagen", "krone", "Europe"),
    "Switzerland": ("Bern", "franc", "Europe"),
    "Hungary": ("Budapest", "forint", "Europe"),
    "Czechia": ("Prague", "koruna", "Europe"),
    "Romania": ("Bucharest", "leu", "Europe"),
    "United Kingdom": ("London", "pound", "Europe"),
    "Russia": ("Moscow", "ruble", "Europe"),
    "Turkey": ("Ankara", "lira", "Asia"),
    "Japan": ("Tokyo", "yen", "Asia"),
    "China": ("Beijing", "yuan", "Asia"),
    "India": ("New Delhi", "rupee", "Asia"),
    "Thailand": ("Bangkok", "baht", "Asia"),
    "Vietnam": ("Hanoi", "dong", "Asia"),
    "Indonesia": ("Jakarta", "rupiah", "Asia"),
    "South Korea": ("Seoul", "won", "Asia"),
    "Iran": ("Tehran", "rial", "Asia"),
    "Egypt": ("Cairo", "pound", "Africa"),
    "Kenya": ("Nairobi", "shilling", "Africa"),
    "Nigeria": ("Abuja", "naira", "Africa"),
    "Morocco": ("Rabat", "dirham", "Africa"),
    "Ghana": ("Accra", "cedi", "Africa"),
    "South Africa": ("Pretoria", "rand", "Africa"),
    "Canada": ("Ottawa", "dollar", "North America"),
    "United States": ("Washington", "dollar", "North America"),
    "Mexico": ("Mexico City", "peso", "North America"),
    "Cuba": ("Havana", "peso", "North America"),
    "Brazil": ("Brasilia", "real", "South America"),
    "Argentina": ("Buenos Aires", "peso", "South America"),
    "Peru": ("Lima", "sol", "South America"),
    "Chile": ("Santiago", "peso", "South America"),
    "Colombia": ("Bogota", "peso", "South America"),
    "Australia": ("Canberra", "dollar", "Oceania"),
    "New Zealand": ("Wellington", "dollar", "Oceania"),
}

RELATIONS = ("capital", "currency", "continent")


def _key(query: str) -> str:
    return " ".join(w for w in query.lower().strip(" ?.!").split() if w != "the")


KNOWLEDGE: dict[str, str] = {
    _key(f"{relation} of {country}"): facts[i]
    for country, facts in COUNTRIES.items()
    for i, relation in enumerate(RELATIONS)
}


def lookup(query: str) -> str:
    """The fact for `"<relation> of <country>"`, or `"not found"`: a miss is an answer, not an error."""
    return KNOWLEDGE.get(_key(query), "not found")
