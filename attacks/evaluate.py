"""Roll a PettingZoo ParallelEnv out with every agent's observation under attack.

``evaluate(policy, env, attack, episodes, seed)`` plays greedy actions of the (perturbed)
observations, batching all agents that share a policy into ONE attack call per step, and
reports per-agent and team returns (mean and 95% confidence interval), the attack success
rate (per agent-step: the perturbed greedy action differs from the clean one, DESIGN.md
section 3) and the mean Linf / L2 perturbation norms, next to a clean run on the same seeds.
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Callable, Union

import torch
from torch import nn

from attacks.base import Attack
from attacks.external import ExternalAttack, is_torchattacks
from marl_fgmf.protocol import policy_device, to_unit
from marl_fgmf.stats import summarize

PolicySpec = Union[nn.Module, Mapping, Callable[[str], nn.Module]]
AttackSpec = Union[None, Attack, Callable[[nn.Module], Attack], Callable[..., Any]]
"""None, an :class:`Attack`, a torchattacks ``Attack`` (wrapped in :class:`ExternalAttack`) or
a factory ``policy -> Attack`` (or ``policy -> torchattacks Attack``)."""

ACCEPTED = ("attack must be None, an Attack or a factory policy -> Attack, a torchattacks "
            "Attack, or ExternalAttack(fn) for a function obs -> adversarial obs")


def _policy_lookup(policy: PolicySpec) -> Callable[[str], nn.Module]:
    if isinstance(policy, nn.Module):
        return lambda agent: policy
    if isinstance(policy, Mapping):
        def lookup(agent: str) -> nn.Module:
            if agent not in policy:
                raise ValueError(f"no policy for agent {agent!r}; policies given for "
                                 f"{', '.join(map(str, policy))}")
            return policy[agent]
        return lookup
    if callable(policy):
        return policy
    raise ValueError(f"policy must be an nn.Module, a mapping agent -> nn.Module or a callable "
                     f"agent -> nn.Module, got {type(policy).__name__}")


class _Run:
    """Accumulates one rollout's statistics."""

    def __init__(self, agents: list[str]):
        self.agent_returns: dict[str, list[float]] = {a: [] for a in agents}
        self.team_returns: list[float] = []
        self.steps = 0
        self.successes = 0
        self.linf_sum = 0.0
        self.l2_sum = 0.0
        self.seconds = 0.0

    def summary(self, attacked: bool) -> dict[str, Any]:
        n = max(self.steps, 1)
        return {
            "team_return": summarize(self.team_returns),
            "agent_return": {a: summarize(r) for a, r in self.agent_returns.items()},
            "team_returns": list(self.team_returns),
            "success_rate": self.successes / n if attacked else 0.0,
            "mean_linf": self.linf_sum / n if attacked else 0.0,
            "mean_l2": self.l2_sum / n if attacked else 0.0,
            "agent_steps": self.steps,
            "time_s": self.seconds,
        }


def _rollout(lookup: Callable[[str], nn.Module], env: Any, attack: AttackSpec, episodes: int,
             seed: int, bar: Any, max_steps: int | None = None) -> _Run:
    run = _Run(list(env.possible_agents))
    attacks: dict[int, Attack] = {}  # one attack copy per distinct policy, seeded reproducibly
    checked: set[tuple[int, str]] = set()
    start = time.perf_counter()
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        totals = {a: 0.0 for a in env.possible_agents}
        t = 0
        while env.agents and (max_steps is None or t < max_steps):
            t += 1
            live = [a for a in env.agents if a in obs]
            groups: dict[int, list[str]] = {}
            policies: dict[int, nn.Module] = {}
            for agent in live:
                p = lookup(agent)
                if not isinstance(p, nn.Module):
                    raise ValueError(f"the policy for {agent!r} must be an nn.Module, "
                                     f"got {type(p).__name__}")
                groups.setdefault(id(p), []).append(agent)
                policies[id(p)] = p
            actions: dict[str, int] = {}
            for key, members in groups.items():
                p = policies[key]
                device, dtype = policy_device(p)
                x = to_unit([obs[a] for a in members]).to(device=device, dtype=dtype)
                with torch.no_grad():
                    logits = p(x)
                for agent in members:
                    if (key, agent) not in checked:
                        _check_action_space(env, agent, logits)
                        checked.add((key, agent))
                clean = logits.argmax(dim=1)
                chosen = clean
                if attack is not None:
                    atk = attacks.get(key)
                    if atk is None:
                        atk = _bind(attack, p, seed + len(attacks))
                        attacks[key] = atk
                    adv = atk(x, clean)
                    with torch.no_grad():
                        chosen = p(adv).argmax(dim=1)
                    delta = (adv - x).flatten(1)
                    run.successes += int((chosen != clean).sum())
                    run.linf_sum += float(delta.abs().amax(dim=1).sum())
                    run.l2_sum += float(delta.norm(dim=1).sum())
                run.steps += len(members)
                actions.update({a: int(c) for a, c in zip(members, chosen.tolist())})
            obs, rewards, _, _, _ = env.step(actions)
            for agent, r in rewards.items():
                totals[agent] = totals.get(agent, 0.0) + float(r)
        for agent in run.agent_returns:
            run.agent_returns[agent].append(totals.get(agent, 0.0))
        run.team_returns.append(float(sum(totals.values())))
        if bar is not None:
            bar.update(1)
    run.seconds = time.perf_counter() - start
    return run


def _check_action_space(env: Any, agent: str, logits: torch.Tensor) -> None:
    space = env.action_space(agent)
    n = getattr(space, "n", None)
    if n is None:
        raise ValueError(f"evaluate needs a discrete action space, {agent!r} has {space}")
    if logits.dim() != 2 or logits.shape[1] != int(n):
        raise ValueError(f"the policy outputs logits of shape {tuple(logits.shape)} but the "
                         f"action space of {agent!r} is Discrete({int(n)}): they must match")


def _bind(attack: AttackSpec, policy: nn.Module, seed: int) -> Attack:
    """``attack`` bound to ``policy`` and seeded. The dispatch, in this order:

    1. an :class:`Attack` (:class:`ExternalAttack` included) is rebound (``with_policy``);
    2. a torchattacks ``Attack`` is wrapped in :class:`ExternalAttack`, then rebound;
    3. any other callable is a FACTORY, called as ``attack(policy)``; it must return an
       :class:`Attack` (or a torchattacks ``Attack``, wrapped). A function ``obs -> adversarial
       obs`` is a callable too, so it is never guessed: wrap it, ``ExternalAttack(fn)``.
    """
    if is_torchattacks(attack):
        attack = ExternalAttack(attack)
    if isinstance(attack, Attack):
        bound = attack.with_policy(policy)
    elif callable(attack):
        hint = "a function obs -> adversarial obs must be wrapped: ExternalAttack(fn, eps=...)"
        try:
            bound = attack(policy)
        except (TypeError, AttributeError) as exc:  # typically obs code handed a module
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise ValueError(f"the attack factory {getattr(attack, '__qualname__', attack)!r} "
                             f"failed on the policy ({type(exc).__name__}: {first}); a factory "
                             f"takes the policy and returns an Attack; {hint}") from exc
        if is_torchattacks(bound):
            bound = ExternalAttack(bound, policy)
        elif not isinstance(bound, Attack):
            raise ValueError(f"an attack factory must return an Attack, got "
                             f"{type(bound).__name__}; {hint}")
    else:
        raise ValueError(f"{ACCEPTED}; got {type(attack).__name__}")
    return bound.set_seed(seed)


def evaluate(policy: PolicySpec, env: Any, attack: AttackSpec = None, episodes: int = 10,
             seed: int = 0, progress: bool = True, *, compare_clean: bool = True,
             max_steps: int | None = None) -> dict[str, Any]:
    """Roll out ``env`` with every agent's observation perturbed by ``attack`` at every step.

    Each step, the agents that share a policy are attacked in ONE batched call (B = number of
    agents); each agent plays the greedy action of its perturbed observation. Episode ``i``
    resets the env with ``seed + i``; the attack is copied per policy (``with_policy``) and
    reseeded from ``seed``, so a run is reproducible and the caller's attack is not mutated.

    Args:
        policy: one ``nn.Module`` for all agents, a mapping agent id -> module, or a callable
            agent id -> module (per-agent policies; agents sharing a module are batched).
        env: a PettingZoo ``ParallelEnv`` with image observations (uint8 frames are divided by
            255) and ``Discrete`` actions matching the policy's logits.
        attack: ``None`` (clean), an :class:`~attacks.base.Attack` (rebound to each policy;
            :class:`~attacks.external.ExternalAttack` wraps a function ``obs -> adversarial
            obs``), a torchattacks ``Attack`` (wrapped in ``ExternalAttack`` automatically), or
            a factory ``policy -> Attack``. Any other callable is taken as a factory: a bare
            function ``obs -> adversarial obs`` is refused with a hint, never guessed.
        episodes: number of episodes, >= 1.
        seed: base seed for the env resets and the attack's randomness.
        progress: show a tqdm progress bar.
        compare_clean: with an attack, also run the same episodes clean (under ``"clean"``).
        max_steps: stop each episode after this many steps (None: when the env ends it); the
            returns are then those of the first ``max_steps`` steps.

    Returns:
        A dict with ``attack`` (its settings, or None), ``episodes``, ``seed`` and the attacked
        run's statistics: ``team_return`` (:func:`marl_fgmf.stats.summarize` of the episodes:
        ``{"mean", "ci95", "low", "high", "n"}``, ``ci95`` NaN for one episode; the team
        return of an episode is the SUM of all agents' returns), ``agent_return`` (agent ->
        the same), ``team_returns`` (per episode), ``success_rate`` (fraction of agent-steps
        whose perturbed greedy action differs from the clean one), ``mean_linf`` and
        ``mean_l2`` (mean per-agent-step norm of ``adv - obs``), ``agent_steps``, ``time_s``;
        and ``clean``: the same statistics of the clean run (when ``compare_clean`` or no
        attack).

    Raises:
        ValueError: bad episodes, policy, attack, or a policy/action-space mismatch.

    Example:
        >>> result = evaluate(net, make_env("beacon"), PGD(net, eps=4/255), episodes=5, seed=0)
        >>> result["team_return"]["mean"], result["clean"]["team_return"]["mean"]
        >>> evaluate(net, env, torchattacks.PGD(unbound_model(), eps=4/255))   # wrapped
        >>> evaluate(net, env, ExternalAttack(lambda obs: obs.flip(2), eps=1.0))
    """
    if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < 1:
        raise ValueError(f"episodes must be an integer >= 1, got {episodes!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int)
                                  or max_steps < 1):
        raise ValueError(f"max_steps must be None or an integer >= 1, got {max_steps!r}")
    if attack is not None and not (isinstance(attack, Attack) or callable(attack)):
        raise ValueError(f"{ACCEPTED}; got {type(attack).__name__}")
    if is_torchattacks(attack):
        attack = ExternalAttack(attack)  # its settings() name it in the result
    lookup = _policy_lookup(policy)
    runs = 2 if attack is not None and compare_clean else 1
    bar = None
    if progress:
        from tqdm.auto import tqdm  # lazy: only when a progress bar is asked for
        name = "clean" if attack is None else getattr(attack, "name", "attack")
        bar = tqdm(total=episodes * runs, desc=f"evaluate {name}", unit="ep")
    try:
        result: dict[str, Any] = {"attack": attack.settings() if isinstance(attack, Attack)
                                  else (None if attack is None else repr(attack)),
                                  "episodes": episodes, "seed": seed, "max_steps": max_steps}
        if attack is None:
            stats = _rollout(lookup, env, None, episodes, seed, bar, max_steps).summary(False)
            result.update(stats)
            result["clean"] = stats
            return result
        result.update(_rollout(lookup, env, attack, episodes, seed, bar, max_steps).summary(True))
        if compare_clean:
            result["clean"] = _rollout(lookup, env, None, episodes, seed, bar,
                                       max_steps).summary(False)
        return result
    finally:
        if bar is not None:
            bar.close()
