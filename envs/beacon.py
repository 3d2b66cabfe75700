"""Beacon: a multi-agent pixel environment with ground-truth relevance.

A PettingZoo ``ParallelEnv`` built for measurement (DESIGN.md section 5). ``n_agents`` agents
move on a ``grid`` x ``grid`` arena; each must reach its own beacon. The arena is rendered as an
RGB image of ``grid * cell`` pixels a side (default 7 x 3 = 21), one image per agent, coloured
from that agent's point of view:

==================  ==================  ==========================================
object              colour (R, G, B)    relevant to the agent?
==================  ==================  ==========================================
the agent itself    (255, 40, 40)       yes
its own beacon      (40, 255, 40)       yes
other agents        (120, 40, 160)      no
other beacons       (40, 120, 160)      no
distractors         grey, flickering    no (random walk, random brightness)
==================  ==================  ==========================================

Rewards: +1 when an agent steps onto its beacon (which then respawns on a random free cell),
plus a shaping term ``shaping * (d_before - d_after)`` on the Manhattan distance to the beacon.
With ``shared_reward=True`` every agent receives the team's mean reward. Episodes truncate after
``max_steps`` steps; there is no termination.

``info[agent]["relevance"]`` is the ground-truth relevance mask, an (H, W) bool array that marks
exactly the pixels of the agent itself and of its own beacon: nothing else carries information
about the agent's reward. :func:`scripted_actions` is the optimal policy (a shortest path to the
beacon), giving the reference return that trained policies are measured against.

Spaces: observation ``Box(0, 255, (H, W, 3), uint8)``; action ``Discrete(5)``
(0 stay, 1 up, 2 down, 3 left, 4 right: :data:`ACTION_NAMES`; up and left are towards row 0
and column 0 of the image).

Version history: v0 (marl-fgmf 0.1).
"""
from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
from gymnasium import spaces
from pettingzoo import ParallelEnv

SELF_COLOUR = (255, 40, 40)
BEACON_COLOUR = (40, 255, 40)
OTHER_AGENT_COLOUR = (120, 40, 160)
OTHER_BEACON_COLOUR = (40, 120, 160)
MOVES = np.array([[0, 0], [-1, 0], [1, 0], [0, -1], [0, 1]])  # stay, up, down, left, right
ACTION_NAMES = ("stay", "up", "down", "left", "right")
"""Names of the discrete actions 0..4 (moves in image rows and columns, :data:`MOVES`)."""
MAX_FRAME_BYTES = 64 * 2**20
"""Bound on one step's observations (n_agents images of (grid*cell)^2 RGB pixels): larger
settings are refused up front instead of allocating until the machine runs out of memory."""


def _check_int(name: str, value: Any, minimum: int, unit: str = "") -> None:
    """An integer setting (not a bool, not a float such as 7.9 that ``int`` would truncate)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) \
            or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}{unit}, got {value!r}")


def _check_size(n_agents: int, grid: int, cell: int, n_distractors: int) -> None:
    """Every agent and beacon needs a cell of its own, and one step's frames must fit
    :data:`MAX_FRAME_BYTES` (checked with integer arithmetic: nothing is allocated)."""
    if 2 * n_agents > grid * grid:
        raise ValueError(f"n_agents={n_agents} do not fit a {grid} x {grid} grid (each agent and "
                         f"its beacon need a cell: at most {grid * grid // 2} agents)")
    if n_distractors > grid * grid:
        raise ValueError(f"n_distractors={n_distractors} exceeds the {grid * grid} cells of a "
                         f"{grid} x {grid} grid")
    side = grid * cell
    frame_bytes = n_agents * side * side * 3
    if frame_bytes > MAX_FRAME_BYTES:
        raise ValueError(f"grid={grid}, cell={cell}, n_agents={n_agents} give {side} x {side} "
                         f"pixel frames, {frame_bytes / 2**20:,.0f} MiB of observations per step "
                         f"(limit {MAX_FRAME_BYTES // 2**20} MiB); use a smaller grid, cell or "
                         f"n_agents")


class BeaconEnv(ParallelEnv):
    """N agents, N beacons, flickering distractors; see the module docstring.

    Args:
        n_agents: number of agents (>= 1).
        grid: arena side in cells (>= 3).
        cell: pixels per cell side (>= 1); the image is ``grid * cell`` pixels a side.
        n_distractors: grey objects that random-walk and flicker, carrying no reward information.
        max_steps: episode length (truncation).
        shaping: weight of the distance-shaping reward.
        shared_reward: give every agent the team's mean reward.
        render_mode: ``None`` or ``"rgb_array"`` (the global view, agent 0's colours).
    """

    metadata = {"name": "beacon_v0", "render_modes": ["rgb_array"], "is_parallelizable": True}

    def __init__(self, n_agents: int = 2, grid: int = 7, cell: int = 3, n_distractors: int = 2,
                 max_steps: int = 50, shaping: float = 0.1, shared_reward: bool = False,
                 render_mode: str | None = None):
        _check_int("n_agents", n_agents, 1)
        _check_int("grid", grid, 3, " cells")
        _check_int("cell", cell, 1, " pixel")
        _check_int("n_distractors", n_distractors, 0)
        _check_int("max_steps", max_steps, 1)
        if isinstance(shaping, bool) or not isinstance(shaping, numbers.Real) \
                or not math.isfinite(shaping):
            raise ValueError(f"shaping must be a finite number, got {shaping!r}")
        if not isinstance(shared_reward, (bool, np.bool_)):
            raise ValueError(f"shared_reward must be true or false, got {shared_reward!r}")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        _check_size(int(n_agents), int(grid), int(cell), int(n_distractors))
        self.n_agents, self.grid, self.cell = int(n_agents), int(grid), int(cell)
        self.n_distractors, self.max_steps = int(n_distractors), int(max_steps)
        self.shaping, self.shared_reward, self.render_mode = float(shaping), bool(shared_reward), render_mode
        self.size = self.grid * self.cell
        self.possible_agents = [f"agent_{i}" for i in range(self.n_agents)]
        self.agents: list[str] = []
        self._obs_space = spaces.Box(0, 255, (self.size, self.size, 3), np.uint8)
        self._act_space = spaces.Discrete(5)
        self._rng = np.random.default_rng()
        self._t = 0

    def observation_space(self, agent: str) -> spaces.Box:
        return self._obs_space

    def action_space(self, agent: str) -> spaces.Discrete:
        return self._act_space

    # ---------------------------------------------------------------- dynamics
    def _free_cell(self, occupied: np.ndarray) -> np.ndarray:
        free = np.argwhere(~occupied)
        return free[self._rng.integers(len(free))]

    def reset(self, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        self.agents = list(self.possible_agents)
        self._t = 0
        occupied = np.zeros((self.grid, self.grid), bool)
        self.pos = np.zeros((self.n_agents, 2), int)
        self.beacon = np.zeros((self.n_agents, 2), int)
        for i in range(self.n_agents):
            self.pos[i] = self._free_cell(occupied)
            occupied[tuple(self.pos[i])] = True
        for i in range(self.n_agents):
            self.beacon[i] = self._free_cell(occupied)
            occupied[tuple(self.beacon[i])] = True
        self.distractors = self._rng.integers(0, self.grid, (self.n_distractors, 2))
        self._distractor_level = self._rng.integers(60, 200, self.n_distractors)
        return self._observations(), self._infos()

    def step(self, actions: dict[str, Any]):
        if not self.agents:
            raise RuntimeError("step() called on a finished episode; call reset() first")
        rewards = np.zeros(self.n_agents)
        for i, agent in enumerate(self.possible_agents):
            a = int(actions.get(agent, 0))
            if not 0 <= a < 5:
                raise ValueError(f"action for {agent} must be in 0..4, got {a}")
            before = np.abs(self.pos[i] - self.beacon[i]).sum()
            self.pos[i] = np.clip(self.pos[i] + MOVES[a], 0, self.grid - 1)
            after = np.abs(self.pos[i] - self.beacon[i]).sum()
            rewards[i] = self.shaping * (before - after)
            if after == 0:
                rewards[i] += 1.0
                occupied = np.zeros((self.grid, self.grid), bool)
                occupied[self.pos[:, 0], self.pos[:, 1]] = True
                occupied[self.beacon[:, 0], self.beacon[:, 1]] = True
                self.beacon[i] = self._free_cell(occupied)
        # distractors: random walk and flicker (no reward information)
        if self.n_distractors:
            steps = MOVES[self._rng.integers(0, 5, self.n_distractors)]
            self.distractors = np.clip(self.distractors + steps, 0, self.grid - 1)
            self._distractor_level = self._rng.integers(60, 200, self.n_distractors)
        self._t += 1
        if self.shared_reward:
            rewards[:] = rewards.mean()
        truncated = self._t >= self.max_steps
        obs, infos = self._observations(), self._infos()
        agents = list(self.agents)
        rew = {a: float(rewards[i]) for i, a in enumerate(self.possible_agents)}
        terms = {a: False for a in agents}
        truncs = {a: truncated for a in agents}
        if truncated:
            self.agents = []
        return obs, rew, terms, truncs, infos

    # --------------------------------------------------------------- rendering
    def _paint(self, img: np.ndarray, cell_rc: np.ndarray, colour) -> None:
        r, c = int(cell_rc[0]) * self.cell, int(cell_rc[1]) * self.cell
        img[r:r + self.cell, c:c + self.cell] = colour

    def _render_for(self, i: int) -> np.ndarray:
        img = np.zeros((self.size, self.size, 3), np.uint8)
        for d, level in zip(self.distractors, self._distractor_level):
            self._paint(img, d, (level, level, level))
        for j in range(self.n_agents):
            if j != i:
                self._paint(img, self.beacon[j], OTHER_BEACON_COLOUR)
        for j in range(self.n_agents):
            if j != i:
                self._paint(img, self.pos[j], OTHER_AGENT_COLOUR)
        self._paint(img, self.beacon[i], BEACON_COLOUR)
        self._paint(img, self.pos[i], SELF_COLOUR)
        return img

    def relevance(self, i: int) -> np.ndarray:
        """(H, W) bool: the pixels of agent ``i`` and of its own beacon."""
        mask = np.zeros((self.size, self.size), bool)
        for rc in (self.pos[i], self.beacon[i]):
            r, c = int(rc[0]) * self.cell, int(rc[1]) * self.cell
            mask[r:r + self.cell, c:c + self.cell] = True
        return mask

    def _observations(self) -> dict[str, np.ndarray]:
        return {a: self._render_for(i) for i, a in enumerate(self.possible_agents) if a in self.agents}

    def _infos(self) -> dict[str, dict]:
        return {a: {"relevance": self.relevance(i)}
                for i, a in enumerate(self.possible_agents) if a in self.agents}

    def render(self) -> np.ndarray | None:
        if self.render_mode is None:
            return None
        return self._render_for(0)

    def close(self) -> None:
        pass


def scripted_actions(env: BeaconEnv) -> dict[str, int]:
    """The optimal policy: each agent takes a step along a shortest path to its beacon
    (vertical first). Reaching beacons as fast as possible maximises both reward terms."""
    actions = {}
    for i, agent in enumerate(env.possible_agents):
        if agent not in env.agents:
            continue
        dr, dc = env.beacon[i] - env.pos[i]
        if dr < 0:
            actions[agent] = 1
        elif dr > 0:
            actions[agent] = 2
        elif dc < 0:
            actions[agent] = 3
        elif dc > 0:
            actions[agent] = 4
        else:
            actions[agent] = 0
    return actions


def scripted_return(episodes: int = 20, seed: int = 0, **env_kwargs) -> float:
    """Mean per-agent episodic return of :func:`scripted_actions` (the reference return)."""
    env = BeaconEnv(**env_kwargs)
    totals = []
    for ep in range(episodes):
        env.reset(seed=seed + ep)
        ret = 0.0
        while env.agents:
            _, rew, _, _, _ = env.step(scripted_actions(env))
            ret += sum(rew.values()) / env.n_agents
        totals.append(ret)
    return float(np.mean(totals))
