"""A tiny text game: the demo's virtual environment (ALFWorld-like, one action per tool call).

The house is a tree of rooms around the hall. The model is asked to fetch an item; it
calls `<game action>start lamp</game>`, reads where it was dropped, walks (`go east`) and picks the
item up (`take lamp`). Every observation names the room, its items, its exits and the
goal (as ALFWorld states the task on reset), so the only thing the model must remember
is which room holds which item. Without the goal in each observation a trained model
lost track of the item it was sent for in 6 of 20 episodes.
"""
from __future__ import annotations

import random
import threading
from collections import deque

# room -> {direction: neighbour}
EXITS: dict[str, dict[str, str]] = {
    "hall": {"north": "kitchen", "east": "library", "south": "garden", "west": "cellar"},
    "kitchen": {"south": "hall"},
    "library": {"west": "hall", "up": "attic"},
    "attic": {"down": "library"},
    "garden": {"north": "hall", "east": "shed"},
    "shed": {"west": "garden"},
    "cellar": {"east": "hall"},
}
ITEMS: dict[str, tuple[str, ...]] = {
    "hall": ("coat",),
    "kitchen": ("apple", "knife"),
    "library": ("book", "map"),
    "attic": ("lamp", "box"),
    "garden": ("flower",),
    "shed": ("shovel", "rake"),
    "cellar": ("wine", "candle"),
}
ROOMS = tuple(EXITS)
ALL_ITEMS = tuple(item for items in ITEMS.values() for item in items)
ITEM_ROOM = {item: room for room, items in ITEMS.items() for item in items}


class TextGame:
    """One episode: where the player stands and what it carries."""

    def __init__(self, room: str, goal: str | None = None) -> None:
        if room not in EXITS:
            raise ValueError(f"unknown room {room!r}; rooms: {ROOMS}")
        self.room = room
        self.goal = goal
        self.items = {r: list(items) for r, items in ITEMS.items()}
        self.inventory: list[str] = []

    def describe(self) -> str:
        """Terse on purpose: the longest episode (shed to attic) must fit the 512 positions."""
        items = ", ".join(self.items[self.room]) or "nothing"
        exits = ", ".join(f"{d} {r}" for d, r in EXITS[self.room].items())
        goal = f". goal: {self.goal}" if self.goal else ""
        return f"{self.room}: {items}. exits: {exits}{goal}"

    def step(self, action: str) -> str:
        """Apply one action (`look`, `go <direction>`, `take <item>`) and return the observation."""
        verb, _, arg = action.strip().lower().partition(" ")
        arg = arg.strip()
        if verb == "look":
            return self.describe()
        if verb == "go":
            if arg not in EXITS[self.room]:
                return f"You cannot go {arg or 'nowhere'} from the {self.room}."
            self.room = EXITS[self.room][arg]
            return self.describe()
        if verb == "take":
            if arg not in self.items[self.room]:
                return f"There is no {arg or 'thing'} here."
            self.items[self.room].remove(arg)
            self.inventory.append(arg)
            return f"You take the {arg}."
        return f"Unknown action {action.strip()!r}. Try look, go <direction>, take <item>."


def next_action(room: str, item: str) -> str:
    """The shortest-path policy the training episodes follow: take the item or step towards it."""
    target = ITEM_ROOM[item]
    if room == target:
        return f"take {item}"
    seen = {room}
    queue = deque([(room, None)])
    while queue:
        here, first = queue.popleft()
        for direction, there in EXITS[here].items():
            if there in seen:
                continue
            step = first or direction
            if there == target:
                return f"go {step}"
            seen.add(there)
            queue.append((there, step))
    raise ValueError(f"no path from {room!r} to {target!r}")


class GameSessions:
    """The game tool's state: one episode per request, begun by the action `start [goal]`.

    Tool functions run on worker threads and a request's calls arrive one at a time, so a
    lock around the dictionary is all the sharing needs. `start` drops the player in a
    room drawn from a seeded generator, so a run of episodes is reproducible.
    """

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)
        self._games: dict[int, TextGame] = {}
        self._lock = threading.Lock()

    def act(self, session: int, action: str) -> str:
        with self._lock:
            verb, _, goal = action.strip().lower().partition(" ")
            if verb == "start":
                self._games[session] = TextGame(self._rng.choice(ROOMS), goal.strip() or None)
                return self._games[session].describe()
            game = self._games.get(session)
        if game is None:
            return "No game is running. Start one with the action start."
        return game.step(action)
