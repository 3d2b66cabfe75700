"""Conformance checks beyond PettingZoo's ``parallel_api_test``: an env's observations must
change within an episode, and show the objects its task depends on.

``parallel_api_test`` and determinism tests pass on an env whose every observation is the
same frame (constant frames are deterministic): PettingZoo's pistonball with
``render_mode=None`` is one. These checks catch that:

* :func:`frames_change_test` (any ``ParallelEnv``): under random actions, every agent's
  observation changes at least once within an episode.
* :func:`objects_visible_test` (the built-in envs, :data:`VISIBLE_OBJECTS`): at every step of
  a random episode, the objects that matter are in the observation where the env's raw state
  says they are, compared pixel by pixel against the env's known colours and geometry: the ball
  in pistonball and cooperative_pong, the evaders in pursuit, each agent and its own beacon in
  beacon.

Both raise ``AssertionError`` with a message naming the env, the step, the agent and what was
wrong, as PettingZoo's tests do, so they can run inside a test suite or by hand::

    from envs import make_env
from envs.beacon import BEACON_COLOUR, SELF_COLOUR
    from envs.conformance import frames_change_test, objects_visible_test
    frames_change_test(make_env("mypackage.envs:make_env"))
    objects_visible_test("pistonball", n_pistons=5)
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
from pettingzoo import ParallelEnv

from envs import make_env
from envs.beacon import BEACON_COLOUR, SELF_COLOUR

VISIBLE_OBJECTS: dict[str, str] = {
    "beacon": "each agent and its own beacon",
    "pistonball": "the ball",
    "cooperative_pong": "the ball (and the paddles)",
    "pursuit": "the evaders",
}
"""What :func:`objects_visible_test` checks, per env."""

BALL_COLOUR = (65, 159, 221)  # pistonball's ball (PettingZoo draws its piston bodies in it too)
LUMA = np.array([0.299, 0.587, 0.114])  # the grayscale weights of envs._preprocess
COLOUR_TOLERANCE = 24  # per channel, for pixels entirely inside an object


def _random_actions(env: ParallelEnv, rng: np.random.Generator) -> dict[Any, Any]:
    actions = {}
    for agent in env.agents:
        space = env.action_space(agent)
        space.seed(int(rng.integers(2**31)))
        actions[agent] = space.sample()
    return actions


def frames_change_test(env: ParallelEnv, steps: int = 30, seed: int = 0,
                       min_change: int = 1) -> dict[Any, float]:
    """Check that every agent's observation changes within an episode under random actions.

    Plays ``steps`` steps of seeded uniformly random actions from ``env.reset(seed=seed)``
    (a finished episode is followed by a reset with the next seed; comparisons never cross a
    reset) and records, per agent, the largest absolute difference between two consecutive
    observations of one episode.

    Returns:
        That largest change per agent.

    Raises:
        AssertionError: an agent whose observations never changed by ``min_change`` or more,
            or that never had two consecutive observations to compare.
    """
    rng = np.random.default_rng(seed)
    largest: dict[Any, float] = {}
    episode = 0
    obs, _ = env.reset(seed=seed)
    for _ in range(steps):
        if not env.agents:
            episode += 1
            obs, _ = env.reset(seed=seed + episode)
            continue
        new_obs, *_ = env.step(_random_actions(env, rng))
        for agent, o in new_obs.items():
            if agent in obs:
                change = float(np.max(np.abs(np.asarray(o, np.float64)
                                             - np.asarray(obs[agent], np.float64)), initial=0.0))
                largest[agent] = max(largest.get(agent, 0.0), change)
        obs = new_obs
    name = getattr(env, "metadata", {}).get("name", type(env).__name__)
    missing = [a for a in env.possible_agents if a not in largest]
    assert not missing, (f"{name}: agents {missing} never had two consecutive observations "
                         f"in {steps} random steps")
    frozen = [a for a, change in largest.items() if change < min_change]
    assert not frozen, (
        f"{name}: the observations of {frozen} never changed over {steps} random steps (largest "
        f"pixel change {max(largest[a] for a in frozen):g} < {min_change}): the env is not "
        f"drawing its observations (a PettingZoo env that renders only with a render mode "
        f"set?)")
    return largest


def objects_visible_test(name: str, steps: int = 30, seed: int = 0,
                         env: ParallelEnv | None = None, **settings: Any) -> int:
    """Check, at every step of random episodes of ``make_env(name, **settings)``, that
    :data:`VISIBLE_OBJECTS` ``[name]`` are visible in each agent's newest frame where the
    env's raw state puts them (see each ``_<env>_visible`` check for its pixel criterion).

    ``env``, if given, is checked instead of a new ``make_env(name, **settings)``: an env of
    kind ``name`` (its ``unwrapped`` is the PettingZoo env the criteria read), built with
    ``settings`` (``grayscale`` says how many channels a frame has).

    Returns:
        The number of (step, agent) observations in which an object was checked.

    Raises:
        AssertionError: an object missing from, or misplaced in, an observation; or no
            observation in which to check it.
        ValueError: an env without such a check (the message lists the ones with one).
    """
    if name not in _CHECKS:
        raise ValueError(f"no visibility check for env {name!r}; envs with one: "
                         f"{', '.join(sorted(_CHECKS))}")
    env = make_env(name, **settings) if env is None else env
    channels = 1 if settings.get("grayscale", False) else 3
    rng = np.random.default_rng(seed)
    checked, episode = 0, 0
    obs, _ = env.reset(seed=seed)
    for step in range(steps + 1):
        for agent, o in obs.items():
            frame = np.asarray(o)[..., -channels:]  # the newest frame of a stack
            checked += _CHECKS[name](env, agent, frame, f"{name}, step {step}, {agent}")
        if step == steps:
            break
        if not env.agents:
            episode += 1
            obs, _ = env.reset(seed=seed + episode)
            continue
        obs, *_ = env.step(_random_actions(env, rng))
    env.close()
    assert checked > 0, f"{name}: {VISIBLE_OBJECTS[name]} never checkable in {steps} steps"
    return checked


# ------------------------------------------------------------------------ per-env criteria
def _near(frame: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """(H, W) bool: pixels within :data:`COLOUR_TOLERANCE` of ``colour`` (its luma when the
    frame has one channel)."""
    target = np.asarray(colour, np.float64)
    if frame.shape[-1] == 1:
        target = np.array([target @ LUMA])
    return (np.abs(frame.astype(np.float64) - target) <= COLOUR_TOLERANCE).all(-1)


def _dilate(mask: np.ndarray, spread: int) -> np.ndarray:
    """A 1-D bool mask grown by ``spread`` elements on each side."""
    out = mask.copy()
    for shift in range(1, spread + 1):
        out[shift:] |= mask[:-shift]
        out[:-shift] |= mask[shift:]
    return out


def _pixel_edges(n_pixels: int, start: float, length: float) -> np.ndarray:
    """Screen coordinates of the ``n_pixels + 1`` edges of an area-resized axis."""
    return start + np.arange(n_pixels + 1) * (length / n_pixels)


def _pistonball_visible(env: ParallelEnv, agent: str, frame: np.ndarray, where: str) -> int:
    """The ball: every pixel of the observation lying entirely inside the ball's disk (away
    from its dark rotation line and from the pistons) is mostly ball-coloured, and no pixel
    of the arena above the pistons away from the ball is ball-coloured."""
    raw = env.unwrapped
    i = raw.agent_name_mapping[agent]
    x_low = raw.wall_width + raw.piston_width * (i - 1)  # the window PettingZoo's observe crops
    y_low = raw.wall_width
    y_high = raw.screen_height - raw.wall_width - raw.piston_body_height
    ys = _pixel_edges(frame.shape[0], y_low, y_high - y_low)
    xs = _pixel_edges(frame.shape[1], x_low, 3 * raw.piston_width)
    top, bottom, left, right = ys[:-1, None], ys[1:, None], xs[None, :-1], xs[None, 1:]
    bx, by = float(raw.ball.position[0]), float(raw.ball.position[1])
    radius = float(raw.ball_radius)
    # farthest and nearest point of each pixel rectangle from the ball's centre
    far = np.hypot(np.maximum(abs(left - bx), abs(right - bx)),
                   np.maximum(abs(top - by), abs(bottom - by)))
    near = np.hypot(np.maximum(0, np.maximum(left - bx, bx - right)),
                    np.maximum(0, np.maximum(top - by, by - bottom)))
    pistons_top = min(p.position[1] - raw.piston_radius for p in raw.pistonList)
    above_pistons = np.broadcast_to(bottom < pistons_top, far.shape)
    arena = (left >= raw.wall_width) & (right <= raw.screen_width - raw.wall_width)
    # the rotation line runs from the centre to the rim: away from it means the pixel's centre
    # is more than a pixel's half-diagonal plus the line's half-width from its direction
    cx, cy = (left + right) / 2 - bx, (top + bottom) / 2 - by
    angle = float(raw.ball.angle)
    along = cx * np.cos(angle) + cy * np.sin(angle)
    across = np.abs(-cx * np.sin(angle) + cy * np.cos(angle))
    half_diagonal = np.hypot(ys[1] - ys[0], xs[1] - xs[0]) / 2
    off_line = (along < -half_diagonal) | (across > half_diagonal + 2)
    inside = (far <= radius - 1) & above_pistons & off_line
    ball_like = _near(frame, BALL_COLOUR)
    n_inside = int(inside.sum())
    if n_inside:
        hits = int(ball_like[inside].sum())
        assert hits * 2 >= n_inside, (
            f"{where}: the ball (centre x={bx:.0f}, y={by:.0f} on the screen) is not drawn: "
            f"{hits} of the {n_inside} pixels inside it have its colour {BALL_COLOUR}")
    stray = ball_like & (near > radius + 1) & above_pistons & arena
    assert not stray.any(), (
        f"{where}: ball-coloured pixels at {np.argwhere(stray)[:3].tolist()} (row, col), away "
        f"from the ball (centre x={bx:.0f}, y={by:.0f}): a stale or misplaced frame")
    return int(n_inside > 0)


def _pong_visible(env: ParallelEnv, agent: str, frame: np.ndarray, where: str) -> int:
    """The ball (white on black, like the paddles): among the pixels at the ball's place (its
    rectangle's footprint, one pixel around it for the resize filter's spread) and away from
    the paddles, the brightest is at least a quarter of what the ball's area would give a
    pixel it covered alone; and every pixel away from the ball and the paddles is black."""
    game = env.unwrapped.env
    ys = _pixel_edges(frame.shape[0], 0, game.s_height)
    xs = _pixel_edges(frame.shape[1], 0, game.s_width)

    def footprint(rects: list, spread: int) -> np.ndarray:
        """Pixels within ``spread`` pixels of any of the rectangles."""
        mask = np.zeros(frame.shape[:2], bool)
        for rect in rects:
            rows = _dilate((ys[1:] > rect.top) & (ys[:-1] < rect.bottom), spread)
            cols = _dilate((xs[1:] > rect.left) & (xs[:-1] < rect.right), spread)
            mask |= np.outer(rows, cols)
        return mask

    ball_rect = game.ball._rect  # PettingZoo's Ball keeps its rectangle private (no accessor)
    paddle_rects = list(game.p0.rects) + list(game.p1.rects)
    values = frame[..., 0]
    stray = (values > 8) & ~footprint([ball_rect], 1) & ~footprint(paddle_rects, 1)
    assert not stray.any(), (
        f"{where}: bright pixels at {np.argwhere(stray)[:3].tolist()} (row, col) away from the "
        f"ball at {tuple(ball_rect)} and the paddles: a stale or misplaced frame")
    ball = footprint([ball_rect], 0)
    # a ball touching a paddle (within the filter's spread) is not told apart from it
    on_screen = game.area.contains(ball_rect) and not (ball & footprint(paddle_rects, 1)).any()
    if on_screen:
        pixel_area = (ys[1] - ys[0]) * (xs[1] - xs[0])
        alone = 255 * min(1.0, ball_rect.width * ball_rect.height / pixel_area)
        assert values[ball].max() >= alone / 4, (
            f"{where}: the ball at {tuple(ball_rect)} (x, y, w, h) is not visible: its pixels "
            f"reach {int(values[ball].max())}, expected at least {alone / 4:.0f}")
    return int(on_screen)


def _pursuit_visible(env: ParallelEnv, agent: str, frame: np.ndarray, where: str) -> int:
    """The evaders: the evader channel of each cell of the pursuer's view is ``85 x`` the
    number of evaders (at most 3) that the raw state puts in that cell, exactly."""
    base = env.unwrapped.env
    i = int(agent.rsplit("_", 1)[1])
    xp, yp = (int(v) for v in base.pursuer_layer.get_position(i))
    view = base.obs_range
    half = view // 2
    counts = np.zeros((view, view))
    for j in range(base.evader_layer.n_agents()):
        x, y = (int(v) for v in base.evader_layer.get_position(j))
        if abs(x - xp) <= half and abs(y - yp) <= half:
            counts[y - yp + half, x - xp + half] += 1  # row = y, column = x
    size = frame.shape[0]
    cells = np.arange(size) * view // size  # the cell each pixel shows (envs.pursuit)
    expected = 85 * np.minimum(counts, 3)[cells][:, cells]
    wrong = np.argwhere(frame[..., 2] != expected)
    assert not len(wrong), (
        f"{where}: evader channel at pixel {wrong[0].tolist()} (row, col) is "
        f"{int(frame[tuple(wrong[0])][2])}, the evaders' positions say "
        f"{int(expected[tuple(wrong[0])])} (pursuer at x={xp}, y={yp})")
    return int(counts.sum() > 0)


def _beacon_visible(env: ParallelEnv, agent: str, frame: np.ndarray, where: str) -> int:
    """Each agent and its own beacon: their cells are painted exactly in their colours."""
    raw = env.unwrapped
    i = raw.possible_agents.index(agent)
    cell = raw.cell
    for what, rc, colour in (("its beacon", raw.beacon[i], BEACON_COLOUR),
                             ("the agent", raw.pos[i], SELF_COLOUR)):
        if what == "its beacon" and np.array_equal(raw.beacon[i], raw.pos[i]):
            continue  # the agent stands on it and is painted over it
        r, c = int(rc[0]) * cell, int(rc[1]) * cell
        block = frame[r:r + cell, c:c + cell]
        assert (block == colour).all(), (
            f"{where}: {what} at cell {tuple(map(int, rc))} is not drawn in {colour}")
    return 1


_CHECKS: dict[str, Callable[[ParallelEnv, Any, np.ndarray, str], int]] = {
    "beacon": _beacon_visible,
    "pistonball": _pistonball_visible,
    "cooperative_pong": _pong_visible,
    "pursuit": _pursuit_visible,
}
