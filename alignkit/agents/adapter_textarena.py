"""TextArena games (textarena 0.7.4) as alignkit environments: `--env textarena:GAME_ID[,k=v...]`.

The policy is player 0. Each user message carries the observations player 0 received since its
last move ("[GAME] ..." / "[Player 1] ..." lines, as textarena's LLMObservationWrapper writes
them, but only the new ones: the conversation already holds the history). The assistant's
whole reply is the action (the game's own action wrappers apply, e.g. brackets added around a
bare move). The reward is 0 on every turn and textarena's reward for player 0 at the end
(win 1 / loss -1 / draw 0 in two-player games; single-player games give their own score, e.g.
GuessTheNumber's closeness).

Options (after the game id): `players=N` (default: the first of 1, 2 the game accepts),
`opponent=random` (required when N > 1), `seed=S` (the base of the seed counter), and any
other key goes to the game's constructor (`textarena:GuessTheNumber-v0,max_turns=5`).

`opponent=random`: textarena 0.7.4 ships no scripted player, so each other player picks, with
its own seeded RNG, one of the moves the game lists for it in its latest observation (the
"Available Moves: '[0]', '[4]'" / "Valid moves: ..." line of TicTacToe, ReverseTicTacToe,
WildTicTacToe, Othello, Crusade, Stratego, ...). A game that lists no moves for the opponent
(ConnectFour, Nim, ...) stops with a one-line error naming the game.

Seeds: `reset(row)` uses `row["seed"]` when the row has one, else the next value of a counter
shared by all instances of one factory (so parallel slots play different games). textarena's
State seeds Python's process-global `random` and its games draw from it, so every reset and
step of every textarena adapter runs under one lock (games are cheap; the lock never waits on
the policy).
"""

from __future__ import annotations

import difflib
import itertools
import random
import re
import threading
from collections.abc import Callable
from typing import Any

from alignkit.agents.adapters import missing_package_error, parse_options
from alignkit.agents.protocol import Message

TEXTARENA_LOCK = threading.Lock()  # textarena reseeds and draws from the global `random`
OWN_OPTIONS = ("players", "opponent", "seed")
MOVES_LINE = re.compile(r"(?:available|valid|legal)\s+(?:moves|actions)\s*:\s*(.+)", re.IGNORECASE)
MAX_OPPONENT_MOVES = 64  # per policy turn: invalid random moves are retried by the game


def listed_moves(text: str) -> list[str]:
    """The moves in the last "Available Moves: ..." line of `text`: its bracketed tokens
    (`'[4]'` -> `[4]`), or else its comma-separated items wrapped in brackets."""
    lines = MOVES_LINE.findall(text)
    if not lines:
        return []
    listed = lines[-1]
    bracketed = re.findall(r"\[[^\[\]]*\]", listed)
    if bracketed:
        return bracketed
    return [f"[{item.strip(' .')}]" for item in listed.split(",") if item.strip(" .'\"")]


def textarena_factory(text: str, spec: str) -> Callable[[], TextArenaEnvironment]:
    """Check the game and options once (the game exists, its player count, the opponent);
    the factory then makes one `TextArenaEnvironment` per conversation slot."""
    try:
        import textarena
    except ImportError as err:
        raise missing_package_error(spec, "textarena", err) from None
    game_id, options = parse_options(text, spec)
    registry = textarena.envs.registration.ENV_REGISTRY
    if game_id not in registry:
        close = difflib.get_close_matches(game_id, list(registry), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"--env {spec}: textarena has no game {game_id!r}{hint}")
    game_kwargs = {k: v for k, v in options.items() if k not in OWN_OPTIONS}
    players = detect_players(game_id, game_kwargs, options.get("players"), spec)
    opponent = options.get("opponent")
    if players > 1 and opponent != "random":
        raise ValueError(f"--env {spec}: {game_id} is a {players}-player game; the policy is "
                         "player 0, add opponent=random for the others")
    if players == 1 and opponent is not None:
        raise ValueError(f"--env {spec}: {game_id} is single-player; drop opponent=")
    seeds = itertools.count(int(options.get("seed", 0)))
    seeds_lock = threading.Lock()

    def next_seed() -> int:
        with seeds_lock:
            return next(seeds)

    def make() -> TextArenaEnvironment:
        return TextArenaEnvironment(game_id, game_kwargs, players, next_seed, spec)

    return make


def detect_players(game_id: str, game_kwargs: dict[str, Any], players: Any, spec: str) -> int:
    """`players` when given, else the first of 1, 2 that the game's reset accepts (each game's
    state asserts its player count); a game that takes neither needs `players=N`."""
    import textarena

    candidates = [players] if players is not None else [1, 2]
    failures = []
    for count in candidates:
        if not isinstance(count, int) or count < 1:
            raise ValueError(f"--env {spec}: players must be a positive integer, got {count!r}")
        try:
            env = textarena.make(game_id, **game_kwargs)
        except TypeError as err:
            raise ValueError(f"--env {spec}: {game_id} does not take these options: {err}") from None
        try:
            with TEXTARENA_LOCK:
                env.reset(num_players=count, seed=0)
            return count
        except (AssertionError, ValueError) as err:
            failures.append(f"{count}: {err}")
    raise ValueError(f"--env {spec}: {game_id} rejected player count {'; '.join(failures)}; "
                     "give players=N")


class TextArenaEnvironment:
    """One TextArena game instance, reset for each episode (see the module docstring)."""

    def __init__(self, game_id: str, game_kwargs: dict[str, Any], players: int,
                 next_seed: Callable[[], int], spec: str):
        import textarena

        self.game = textarena.make(game_id, **game_kwargs)
        core = self.game
        while isinstance(core, textarena.Wrapper):  # observations from the game itself:
            core = core.env  # the LLM observation wrapper would resend the whole history
        self.core = core
        self.players = players
        self.next_seed = next_seed
        self.spec = spec
        self.opponent_rng = random.Random(0)
        self.done = True

    def reset(self, row: dict[str, Any]) -> list[Message]:
        seed = row.get("seed")
        seed = self.next_seed() if seed is None else int(seed)
        self.opponent_rng = random.Random(seed)
        with TEXTARENA_LOCK:
            self.game.reset(num_players=self.players, seed=seed)
            self.done = self._play_opponents()
        if self.done:
            raise ValueError(f"--env {self.spec}: the game ended before player 0 moved (seed {seed})")
        return [{"role": "user", "content": self._observation()}]

    def step(self, messages: list[Message]) -> tuple[Any, float, bool, dict[str, Any]]:
        if self.done:
            raise ValueError(f"--env {self.spec}: step after the game ended; call reset first")
        last = messages[-1] if messages else {}
        if last.get("role") != "assistant":
            raise ValueError(f"--env {self.spec}: step needs the conversation to end with the "
                             "policy's assistant turn")
        with TEXTARENA_LOCK:
            self.done, _ = self.game.step(str(last.get("content") or ""))
            if not self.done:
                self.done = self._play_opponents()
        if not self.done:
            return {"role": "user", "content": self._observation()}, 0.0, False, {}
        rewards, game_info = self.game.close()
        info = game_info.get(0, {})
        return None, float((rewards or {}).get(0, 0.0)), True, {
            "invalid_move": float(bool(info.get("invalid_move"))),
            "game_turns": float(info.get("turn_count", 0)),
            "reason": str(info.get("reason", "")),
        }

    def _play_opponents(self) -> bool:
        """Random moves for every other player until it is player 0's turn; returns done."""
        for _ in range(MAX_OPPONENT_MOVES):
            player = self.core.state.current_player_id
            if player == 0:
                return False
            _, observation = self.core.get_observation()
            moves = listed_moves("\n".join(str(message) for _, message, _ in observation))
            if not moves:
                raise ValueError(f"--env {self.spec}: opponent=random needs the game to list "
                                 f"player {player}'s moves ('Available Moves: ...'); "
                                 f"{self.core.env_id} does not")
            done, _ = self.game.step(self.opponent_rng.choice(moves))
            if done:
                return True
        raise ValueError(f"--env {self.spec}: the random opponent made {MAX_OPPONENT_MOVES} moves "
                         "without the turn coming back to player 0")

    def _observation(self) -> str:
        """Player 0's new observations as "[SENDER] text" lines, without its own move echoed."""
        import textarena

        _, observation = self.core.get_observation()
        roles = self.core.state.role_mapping
        lines = []
        for sender, message, kind in observation:
            if sender == 0 and kind == textarena.ObservationType.PLAYER_ACTION:
                continue
            name = "GAME" if sender == textarena.GAME_ID else roles.get(sender, f"Player {sender}")
            lines.append(f"[{name}] {message}")
        return "\n".join(lines)
