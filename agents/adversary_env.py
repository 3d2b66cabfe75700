"""The learned-adversary game: a PettingZoo env that turns frozen victims into an attack game.

:class:`AdversaryEnv` wraps a multi-agent ``ParallelEnv`` whose agents are played by FROZEN
victim policies (torch modules on the policy protocol, DESIGN.md section 1) and exposes new
agents, the adversaries, whose actions become observation perturbations. Training those
adversaries with RLlib multi-agent PPO (:func:`agents.adversary.train_adversary`) gives a
learned attack; :class:`attacks.learned.LearnedAdversary` replays a trained one as an ordinary
attack. The papers (ATLA for ``perturb``, PA-AD for ``pa-ad``) and the maths that turns an
adversary's action into a perturbation are in :mod:`attacks.learned`, shared by the game and
the replay.

Agents (per-victim mode, the default): one adversary ``adv_<victim>`` for each attacked victim
(all victims unless ``attacked`` names a subset). Team mode (``team=True``): ONE adversary,
``adv_team``, that perturbs every attacked victim at once.

Spaces (``H x W x C`` the victim's observation, ``N`` the number of attacked victims, ``n`` the
victim's number of actions, ``g = (gh, gw)`` the ``grid``):

=============  ==================================  ===========================================
               per victim                           team
=============  ==================================  ===========================================
observation    the victim's clean observation,      the attacked victims' clean observations
               same space (uint8 ``(H, W, C)``)     concatenated on channels, ``(H, W, N*C)``
perturb        ``Box(-1, 1, (gh*gw*C,))``           ``Box(-1, 1, (gh*gw*N*C,))``
pa-ad          ``Discrete(n)``: the target action   ``MultiDiscrete([n] * N)``, one per victim
=============  ==================================  ===========================================

Perturbation (``perturb``): :func:`attacks.learned.perturbation_from_action` of the flat action
(in team mode channel group ``i`` belongs to the ``i``-th attacked victim), added to the clean
observation scaled to [0, 1] and clipped to [0, 1]. The step accepts any real vector: PPO's
Gaussian samples are unbounded and :func:`agents.adversary.train_adversary` hands them to the
env unclipped (``normalize_actions=False``) so that the squash, not a clip at +-1, sets the
reachable range; ``Box(-1, 1)`` is the nominal space that samplers and tests draw from. A grid
of 7 on a 21 x 21 beacon frame is one value per 3 x 3 cell and channel (147 numbers), the
resolution at which beacon draws its objects.

Perturbation (``pa-ad``): the victim's observation is moved toward the target action by
:func:`attacks.learned.realize_target` (``pa_ad_steps`` targeted Linf PGD steps).

In both modes every perturbed observation lies in ``[x - eps, x + eps] ∩ [0, 1]`` (``x`` in
[0, 1] units; the victims see these float observations, unquantized). An adversary that sends
no action for a step leaves its victim's observation clean.

Step: the adversaries act on the clean observations; their actions become perturbations; each
victim acts on its (perturbed) observation, greedily (``argmax`` of its logits, the default,
as attacks are evaluated in :func:`attacks.evaluate`) or, with ``victim_greedy=False``, by
sampling its softmax with the wrapper's seeded generator; victims that are not attacked act on
clean observations; the wrapped env steps with the victims' actions.

Rewards: per-victim mode, ``r(adv_v) = -r(v)``; team mode, ``r(adv_team) = -mean_v r(v)`` over
the attacked victims. An adversary terminates or truncates with its victim (team: when the
last attacked victim does). ``info[adv]`` holds ``victim``, ``victim_reward``,
``victim_action``, ``clean_action`` (the victim's action on the clean observation),
``attack_success`` (the two differ) and ``linf`` (the perturbation's Linf norm); the team
adversary's info holds the same keys as per-victim dicts plus ``success_rate``.
:attr:`AdversaryEnv.last_victim_obs` keeps the observations the victims saw last step.

Victims are put in eval mode and never trained here; gradients are taken with respect to the
observations only. Victims from a checkpoint: :func:`agents.adversary.make_adversary_env`
(this module depends on torch, pettingzoo, :mod:`attacks.learned` and
:mod:`marl_fgmf.protocol`, not on RLlib).

Version history: v0 (marl-fgmf 0.1).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Union

import numpy as np
import torch
from gymnasium import spaces
from pettingzoo import ParallelEnv
from torch import nn

from attacks.base import check_positive_int
from attacks.learned import (check_grid, check_mode, check_upsample, perturbation_from_action,
                             realize_target, split_team, stack_team)
from marl_fgmf.protocol import obs_scale, parse_budget, to_unit

ADV_PREFIX = "adv_"
TEAM_AGENT = "adv_team"

VictimSpec = Union[nn.Module, Mapping[str, nn.Module]]

__all__ = ["ADV_PREFIX", "AdversaryEnv", "TEAM_AGENT", "adversary_id"]


def adversary_id(victim: str) -> str:
    """The adversary agent id of ``victim`` in per-victim mode (``adv_<victim>``)."""
    return f"{ADV_PREFIX}{victim}"


# --------------------------------------------------------------------------- the env
class AdversaryEnv(ParallelEnv):
    """Adversary agents against frozen victims (see the module docstring).

    Args:
        victim_env: the PettingZoo ``ParallelEnv`` the victims play (image observations,
            ``Discrete`` actions).
        victims: one ``nn.Module`` for every victim, or a mapping victim id -> module (agents
            sharing a module are batched). Modules follow the policy protocol; they are put
            in eval mode. From a checkpoint: :func:`agents.adversary.make_adversary_env`.
        eps: Linf budget in [0, 1] units (a number or ``"8/255"``), in (0, 1].
        mode: ``perturb`` (ATLA) or ``pa-ad`` (PA-AD).
        team: one adversary (``adv_team``) for all attacked victims instead of one each.
        grid: ``perturb`` resolution, an int or ``(gh, gw)``. (Default: 7)
        upsample: ``nearest`` or ``bilinear``. (Default: ``nearest``)
        attacked: the victims that get adversaries (default: all ``possible_agents``).
        victim_greedy: victims play ``argmax`` (True) or sample their softmax (False).
        pa_ad_steps: PGD steps of the ``pa-ad`` realization, >= 1. (Default: 3)
        device: where the victims run. (Default: ``cpu``)

    Raises:
        ValueError: bad mode, budget, grid, victims or spaces (one line naming the value).

    Example::

        >>> env = AdversaryEnv(make_env("beacon"), victim_net, eps=8/255, mode="perturb")
        >>> obs, infos = env.reset(seed=0)
        >>> obs, rew, term, trunc, infos = env.step(
        ...     {a: env.action_space(a).sample() for a in env.agents})
    """

    def __init__(self, victim_env: ParallelEnv, victims: VictimSpec, eps: float | str = 8 / 255,
                 mode: str = "perturb", team: bool = False, grid: int | Sequence[int] = 7,
                 upsample: str = "nearest", attacked: Sequence[str] | None = None,
                 victim_greedy: bool = True, pa_ad_steps: int = 3,
                 device: str | torch.device = "cpu"):
        self.victim_env = victim_env
        self.eps = parse_budget(eps)
        self.mode = check_mode(mode)
        self.team = bool(team)
        self.upsample = check_upsample(upsample)
        self.victim_greedy = bool(victim_greedy)
        self.pa_ad_steps = check_positive_int(pa_ad_steps, "pa_ad_steps")
        self.device = torch.device(device)
        self.victim_agents = list(victim_env.possible_agents)
        if attacked is None:
            attacked = list(self.victim_agents)
        unknown = [a for a in attacked if a not in self.victim_agents]
        if unknown or not attacked:
            raise ValueError(f"attacked must name victims among {self.victim_agents}, "
                             f"got {list(attacked)!r}")
        self.attacked = [a for a in self.victim_agents if a in set(attacked)]
        self._policies = self._resolve_victims(victims)
        self._scale = {v: obs_scale(getattr(victim_env.observation_space(v), "high", 1.0))
                       for v in self.victim_agents}
        self.n_actions = self._check_victim_spaces()

        first = victim_env.observation_space(self.attacked[0])
        h, w, c = first.shape
        self.victim_obs_shape = (h, w, c)
        self.grid = check_grid(grid, h, w)
        gh, gw = self.grid
        if self.team:
            if any(victim_env.observation_space(v).shape != first.shape for v in self.attacked):
                raise ValueError("team mode needs every attacked victim to have the same "
                                 "observation shape")
            n = len(self.attacked)
            obs_space = spaces.Box(np.concatenate([first.low] * n, axis=-1),
                                   np.concatenate([first.high] * n, axis=-1),
                                   (h, w, n * c), first.dtype)
            act_space: spaces.Space = (spaces.Box(-1.0, 1.0, (gh * gw * n * c,), np.float32)
                                       if self.mode == "perturb"
                                       else spaces.MultiDiscrete([self.n_actions] * n))
            self.possible_agents = [TEAM_AGENT]
            self._obs_spaces = {TEAM_AGENT: obs_space}
            self._act_spaces = {TEAM_AGENT: act_space}
        else:
            self.possible_agents = [adversary_id(v) for v in self.attacked]
            self._obs_spaces = {adversary_id(v): victim_env.observation_space(v)
                                for v in self.attacked}
            self._act_spaces = {
                adversary_id(v): (spaces.Box(-1.0, 1.0, (gh * gw * c,), np.float32)
                                  if self.mode == "perturb" else spaces.Discrete(self.n_actions))
                for v in self.attacked}
        self.agents: list[str] = []
        self.render_mode = getattr(victim_env, "render_mode", None)
        inner_name = getattr(victim_env, "metadata", {}).get("name", type(victim_env).__name__)
        self.metadata = {"name": f"adversary_{inner_name}", "render_modes":
                         getattr(victim_env, "metadata", {}).get("render_modes", []),
                         "is_parallelizable": True}
        self._rng = np.random.default_rng()
        self._clean: dict[str, np.ndarray] = {}
        self.last_victim_obs: dict[str, np.ndarray] = {}

    # ---------------------------------------------------------------- set-up helpers
    def _resolve_victims(self, victims: VictimSpec) -> dict[str, nn.Module]:
        if isinstance(victims, nn.Module):
            table = {v: victims for v in self.victim_agents}
        elif isinstance(victims, Mapping):
            missing = [v for v in self.victim_agents if v not in victims]
            if missing:
                raise ValueError(f"no victim policy for agents {missing}; "
                                 f"given for {list(victims)}")
            table = {v: victims[v] for v in self.victim_agents}
        else:
            raise ValueError(f"victims must be an nn.Module or a mapping agent -> nn.Module, got "
                             f"{type(victims).__name__} (load checkpoints with "
                             f"agents.adversary.make_adversary_env)")
        for v, p in table.items():
            if not isinstance(p, nn.Module):
                raise ValueError(f"the victim policy for {v!r} must be an nn.Module, "
                                 f"got {type(p).__name__}")
            p.to(self.device).eval()
        return table

    def _check_victim_spaces(self) -> int:
        ns = set()
        for v in self.victim_agents:
            space = self.victim_env.action_space(v)
            if not isinstance(space, spaces.Discrete):
                raise ValueError(f"victims need Discrete actions; {v!r} has {space}")
            ns.add(int(space.n))
            obs_space = self.victim_env.observation_space(v)
            if not isinstance(obs_space, spaces.Box) or len(obs_space.shape) != 3:
                raise ValueError(f"victims need (H, W, C) image observations; {v!r} has {obs_space}")
        if len(ns) != 1:
            raise ValueError(f"all victims must have the same number of actions, got {sorted(ns)}")
        return ns.pop()

    # ---------------------------------------------------------------- PettingZoo API
    def observation_space(self, agent: str) -> spaces.Space:
        return self._obs_spaces[agent]

    def action_space(self, agent: str) -> spaces.Space:
        return self._act_spaces[agent]

    def reset(self, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self._rng = np.random.default_rng(seed)
            for i, agent in enumerate(self.possible_agents):
                self._act_spaces[agent].seed(seed + i)
        obs, infos = self.victim_env.reset(seed=seed, options=options)
        self._clean = dict(obs)
        self.last_victim_obs = {}
        self.agents = self._live_adversaries()
        return self._adversary_obs(self.agents), {a: self._reset_info(a) for a in self.agents}

    def step(self, actions: dict[str, Any]):
        if not self.agents:
            raise RuntimeError("step() called on a finished episode; call reset() first")
        live_adv = list(self.agents)
        live_victims = [v for v in self.victim_env.agents if v in self._clean]
        clean = {v: self._to_unit(v, self._clean[v]) for v in live_victims}
        seen = dict(clean)
        seen.update(self._perturb({v: clean[v] for v in live_victims if v in self.attacked},
                                  actions))
        victim_actions, clean_actions = self._act(
            seen, {v: clean[v] for v in live_victims if v in self.attacked})
        self.last_victim_obs = {v: x.cpu().numpy() for v, x in seen.items()}
        obs, rew, term, trunc, _ = self.victim_env.step(victim_actions)
        self._clean.update(obs)

        rewards: dict[str, float] = {}
        infos: dict[str, dict] = {}
        terms: dict[str, bool] = {}
        truncs: dict[str, bool] = {}
        per_victim = {}
        for v in self.attacked:
            if v not in clean:
                continue
            r = float(rew.get(v, 0.0))
            linf = float((seen[v] - clean[v]).abs().max())
            victim_action = int(victim_actions[v])
            clean_action = int(clean_actions[v])
            per_victim[v] = {"victim": v, "victim_reward": r, "victim_action": victim_action,
                             "clean_action": clean_action,
                             "attack_success": victim_action != clean_action, "linf": linf}
        if self.team:
            if TEAM_AGENT in live_adv:
                rs = [d["victim_reward"] for d in per_victim.values()]
                rewards[TEAM_AGENT] = -float(np.mean(rs)) if rs else 0.0
                info = {key: {v: d[key] for v, d in per_victim.items()}
                        for key in ("victim_reward", "victim_action", "clean_action",
                                    "attack_success", "linf")}
                info["success_rate"] = (float(np.mean(list(info["attack_success"].values())))
                                        if per_victim else 0.0)
                infos[TEAM_AGENT] = info
                done = not any(v in self.victim_env.agents for v in self.attacked)
                any_trunc = any(bool(trunc.get(v, False)) for v in per_victim)
                terms[TEAM_AGENT] = done and not any_trunc
                truncs[TEAM_AGENT] = done and any_trunc
        else:
            for v, info in per_victim.items():
                a = adversary_id(v)
                if a not in live_adv:
                    continue
                rewards[a] = -info["victim_reward"]
                infos[a] = info
                gone = v not in self.victim_env.agents
                terms[a] = bool(term.get(v, gone and not trunc.get(v, False)))
                truncs[a] = bool(trunc.get(v, False))
        self.agents = self._live_adversaries()
        return self._adversary_obs(live_adv), rewards, terms, truncs, infos

    def render(self) -> Any:
        return self.victim_env.render()

    def close(self) -> None:
        self.victim_env.close()

    # ---------------------------------------------------------------- internals
    def _live_adversaries(self) -> list[str]:
        alive = [v for v in self.attacked if v in self.victim_env.agents]
        if self.team:
            return [TEAM_AGENT] if alive else []
        return [adversary_id(v) for v in alive]

    def _reset_info(self, agent: str) -> dict:
        if self.team:
            return {"victims": list(self.attacked)}
        return {"victim": agent[len(ADV_PREFIX):]}

    def _adversary_obs(self, agents: list[str]) -> dict[str, np.ndarray]:
        out = {}
        for agent in agents:
            if self.team:
                out[agent] = np.concatenate([self._clean[v] for v in self.attacked], axis=-1)
            else:
                out[agent] = self._clean[agent[len(ADV_PREFIX):]]
        return out

    def _to_unit(self, victim: str, frame: np.ndarray) -> torch.Tensor:
        return to_unit(frame, self._scale[victim], self.device)

    def _perturb(self, clean: dict[str, torch.Tensor], actions: dict[str, Any]
                 ) -> dict[str, torch.Tensor]:
        """Perturbed [0, 1] observations of the attacked live victims."""
        if not clean:
            return {}
        victims = list(clean)
        if self.team:
            action = actions.get(TEAM_AGENT)
            if action is None:
                return dict(clean)
            if self.mode == "perturb":
                full = torch.stack([clean[v] if v in clean else
                                    self._to_unit(v, self._clean[v]) for v in self.attacked])
                team_obs = stack_team(full, len(self.attacked))  # (1, H, W, N*C)
                a = self._box_action(TEAM_AGENT, action)
                delta = perturbation_from_action(a[None], team_obs.shape[1:], self.grid,
                                                 self.eps, self.upsample)
                per = split_team(delta, len(self.attacked))
                index = {v: i for i, v in enumerate(self.attacked)}
                return {v: (clean[v] + per[index[v]]).clamp(0.0, 1.0) for v in victims}
            targets = self._discrete_action(TEAM_AGENT, action, len(self.attacked))
            index = {v: i for i, v in enumerate(self.attacked)}
            return self._realize(clean, {v: int(targets[index[v]]) for v in victims})
        acting = [v for v in victims if adversary_id(v) in actions]
        out = dict(clean)
        if not acting:
            return out
        if self.mode == "perturb":
            a = torch.stack([self._box_action(adversary_id(v), actions[adversary_id(v)])
                             for v in acting])
            delta = perturbation_from_action(a, self.victim_obs_shape, self.grid, self.eps,
                                             self.upsample)
            for i, v in enumerate(acting):
                out[v] = (clean[v] + delta[i]).clamp(0.0, 1.0)
            return out
        targets = {v: int(self._discrete_action(adversary_id(v), actions[adversary_id(v)], 1)[0])
                   for v in acting}
        out.update(self._realize({v: clean[v] for v in acting}, targets))
        return out

    def _realize(self, clean: dict[str, torch.Tensor], targets: dict[str, int]
                 ) -> dict[str, torch.Tensor]:
        out = {}
        for members in self._groups(list(clean)):
            policy = self._policies[members[0]]
            x = torch.stack([clean[v] for v in members])
            t = torch.as_tensor([targets[v] for v in members], device=self.device)
            adv = realize_target(policy, x, t, self.eps, self.pa_ad_steps)
            out.update({v: adv[i] for i, v in enumerate(members)})
        return out

    def _box_action(self, agent: str, action: Any) -> torch.Tensor:
        a = torch.as_tensor(np.asarray(action, dtype=np.float32).reshape(-1), device=self.device)
        size = int(np.prod(self._act_spaces[agent].shape))
        if a.numel() != size:
            raise ValueError(f"action of {agent!r} must hold {size} numbers "
                             f"(grid {self.grid}), got {a.numel()}")
        if not bool(torch.isfinite(a).all()):
            raise ValueError(f"action of {agent!r} must be finite, got NaN/inf")
        return a

    def _discrete_action(self, agent: str, action: Any, count: int) -> np.ndarray:
        a = np.asarray(action).reshape(-1)
        if a.size != count or (not np.issubdtype(a.dtype, np.integer) and not np.all(a == np.round(a))):
            raise ValueError(f"action of {agent!r} must be {count} target action(s) in "
                             f"0..{self.n_actions - 1}, got {action!r}")
        a = a.astype(np.int64)
        if a.min() < 0 or a.max() >= self.n_actions:
            raise ValueError(f"action of {agent!r} must be in 0..{self.n_actions - 1}, "
                             f"got {action!r}")
        return a

    def _groups(self, victims: list[str]) -> list[list[str]]:
        groups: dict[int, list[str]] = {}
        for v in victims:
            groups.setdefault(id(self._policies[v]), []).append(v)
        return list(groups.values())

    @torch.no_grad()
    def _act(self, seen: dict[str, torch.Tensor], clean: dict[str, torch.Tensor]
             ) -> tuple[dict[str, int], dict[str, int]]:
        """The victims' actions on what they see (greedy or sampled) and their greedy actions
        on the clean observations, from one batched forward pass per victim policy."""
        frames = [("seen", v, x) for v, x in seen.items()] + [("clean", v, x) for v, x in clean.items()]
        groups: dict[int, list[tuple[str, str, torch.Tensor]]] = {}
        for item in frames:
            groups.setdefault(id(self._policies[item[1]]), []).append(item)
        acted: dict[str, int] = {}
        greedy_clean: dict[str, int] = {}
        for items in groups.values():
            logits = self._policies[items[0][1]](torch.stack([x for _, _, x in items]))
            if logits.dim() != 2 or logits.shape[1] != self.n_actions:
                raise ValueError(f"victim policy outputs logits of shape {tuple(logits.shape)}, "
                                 f"the env has Discrete({self.n_actions}) actions")
            greedy = logits.argmax(dim=1).tolist()
            probs = None
            if not self.victim_greedy:
                probs = torch.softmax(logits.double(), dim=1).cpu().numpy()
            for k, (kind, v, _) in enumerate(items):
                if kind == "clean":
                    greedy_clean[v] = int(greedy[k])
                elif probs is None:
                    acted[v] = int(greedy[k])
                else:
                    acted[v] = int(self._rng.choice(self.n_actions, p=probs[k] / probs[k].sum()))
        return acted, greedy_clean
