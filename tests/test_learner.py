"""The FGMF PPO learner (agents.learner) on a real RLlib Learner, built locally (no Ray actors).

What it must do (DESIGN.md section 3): the loss is RLlib's PPO loss plus the FGMF terms, with
the terms in the gradient; SCOR-PIO penalizes about ``reg_fraction`` of the rows of each
minibatch, each drawn row's subspace computed once per iteration; the per-iteration state is
dropped after each update (a fresh draw next iteration); ``LOSS_MASK``-ed rows never reach a
term; everything is logged under ``fgmf_*``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from ray.rllib.algorithms.ppo.torch.ppo_torch_learner import PPOTorchLearner
from ray.rllib.core.columns import Columns
from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch

import agents.learner as learner_module
import marl_fgmf.scorpio.iteration as iteration
from agents.learner import FGMFPPOTorchLearner
from agents.train import TrainConfig, build_algo_config, env_spaces
from marl_fgmf.scorpio import row_keys, select_keyed_rows

pytestmark = pytest.mark.usefixtures("one_thread")

N, MINIBATCH, EPOCHS = 96, 32, 2
# reg_every=1: R at every SGD step, so that each step's loss can be checked against its rows
SCORPIO = {"reg_fraction": 0.25, "lambda_curv": 1.0, "lambda_grad": 100.0, "reg_every": 1}


def make_learner(defense: str = "scorpio", settings: dict | None = None):
    cfg = TrainConfig(env="beacon", defense=defense, train_batch_size=N,
                      minibatch_size=MINIBATCH, num_epochs=EPOCHS,
                      defense_settings=settings if settings is not None else
                      {"scorpio": dict(SCORPIO)})
    algo_config = build_algo_config(cfg)
    agents, obs_space, act_space = env_spaces(cfg)
    spaces = {"__env__": (obs_space, act_space), **{a: (obs_space, act_space) for a in agents}}
    learner = algo_config.build_learner(env=None, spaces=spaces)
    learner.build()
    assert isinstance(learner, FGMFPPOTorchLearner)
    return learner, obs_space, act_space


def train_batch(obs_space, act_space, seed: int = 0, mask: np.ndarray | None = None):
    rng = np.random.default_rng(seed)
    obs = rng.integers(0, 256, size=(N,) + obs_space.shape).astype(obs_space.dtype)
    n_act = act_space.n
    data = {Columns.OBS: obs, Columns.ACTIONS: rng.integers(0, n_act, N),
            Columns.ACTION_LOGP: np.full(N, -np.log(n_act), dtype=np.float32),
            Columns.ACTION_DIST_INPUTS: np.zeros((N, n_act), np.float32),
            "advantages": rng.standard_normal(N).astype(np.float32),
            "value_targets": rng.standard_normal(N).astype(np.float32),
            Columns.VF_PREDS: np.zeros(N, np.float32),
            Columns.LOSS_MASK: np.ones(N, bool) if mask is None else mask}
    return MultiAgentBatch({"shared": SampleBatch(data)}, env_steps=N)


def update(learner, batch):
    return learner.update(batch=batch, minibatch_size=MINIBATCH, num_epochs=EPOCHS,
                          shuffle_batch_per_epoch=True,
                          timesteps={"num_env_steps_sampled_lifetime": N})


@pytest.fixture
def spy(monkeypatch):
    """Records, per SGD step: the minibatch's unmasked observations (scaled) and the rows R
    was evaluated on."""
    steps: list[dict] = []
    real_loss = FGMFPPOTorchLearner.compute_loss_for_module
    real_reg = iteration.scorpio_regularizer

    def loss(self, **kw):
        batch = kw["batch"]
        obs = self.module[kw["module_id"]].unwrapped().scale_obs(batch[Columns.OBS])
        steps.append({"obs": obs[batch[Columns.LOSS_MASK].bool()].detach().clone(),
                      "penalized": []})
        return real_loss(self, **kw)

    def reg(policy, obs, config, subspace=None):
        steps[-1]["penalized"].append(subspace.obs.detach().clone())
        return real_reg(policy, obs, config, subspace=subspace)

    real_penalty = iteration.IterationSubspaces.penalty

    def penalty(self, policy, obs, transform=None, digests=None):
        # the rows SCOR-PIO draws from (behind SGAM it is regularized at SGAM(row))
        steps[-1]["drawn_from"] = obs.detach().clone()
        steps[-1]["transform"] = transform
        return real_penalty(self, policy, obs, transform=transform, digests=digests)

    monkeypatch.setattr(FGMFPPOTorchLearner, "compute_loss_for_module", loss)
    monkeypatch.setattr(iteration, "scorpio_regularizer", reg)
    monkeypatch.setattr(iteration.IterationSubspaces, "penalty", penalty)
    return steps


def keys_of(x: torch.Tensor) -> set[bytes]:
    return set(row_keys(x, salt=0))


def test_loss_is_ppo_plus_r_with_r_in_the_gradient(monkeypatch):
    # R is ~1e-10 at PPO's near-uniform init: large weights make its gradient comparable
    learner, obs_space, act_space = make_learner(
        settings={"scorpio": {**SCORPIO, "lambda_curv": 1e5, "lambda_grad": 1e5}})
    batch = train_batch(obs_space, act_space)
    checked = []
    real = FGMFPPOTorchLearner.compute_loss_for_module

    def check(self, **kw):
        total = real(self, **kw)
        ppo = PPOTorchLearner.compute_loss_for_module(self, **kw)
        module = self.module[kw["module_id"]].unwrapped()
        obs = module.scale_obs(kw["batch"][Columns.OBS]).detach()
        # the same iteration object, the same minibatch: the same rows and subspace
        r, _ = self._fgmf_cache[kw["module_id"]].penalty(module.net, obs)
        params = [p for p in module.parameters() if p.requires_grad]
        g_total = torch.autograd.grad(total, params, retain_graph=True, allow_unused=True)
        g_ppo = torch.autograd.grad(ppo, params, retain_graph=True, allow_unused=True)
        g_r = torch.autograd.grad(r, params, retain_graph=True, allow_unused=True)
        zero = torch.zeros(())
        flat = [torch.cat([(g if g is not None else zero.expand_as(p)).flatten()
                           for g, p in zip(gs, params)]) for gs in (g_total, g_ppo, g_r)]
        checked.append((float(total.detach()), float(ppo.detach()), float(r.detach()), *flat))
        return total

    monkeypatch.setattr(FGMFPPOTorchLearner, "compute_loss_for_module", check)
    update(learner, batch)
    assert len(checked) == EPOCHS * N // MINIBATCH
    for total, ppo, r, g_total, g_ppo, g_r in checked:
        assert r > 0 and total == pytest.approx(ppo + r, rel=1e-5, abs=1e-7)
        assert g_r.norm() > 1e-3 * g_ppo.norm()                 # R moves the parameters
        assert torch.allclose(g_total, g_ppo + g_r, rtol=1e-4, atol=1e-6)


def test_each_step_penalizes_rows_of_its_own_minibatch_subspaces_once_per_iteration(spy):
    learner, obs_space, act_space = make_learner()
    batch = train_batch(obs_space, act_space)
    res = update(learner, batch)
    assert learner._fgmf_cache == {}  # the iteration's state is dropped after the update
    steps = spy
    assert len(steps) == EPOCHS * N // MINIBATCH
    n_expected = SCORPIO["reg_fraction"] * MINIBATCH
    penalized_sets = []
    for step in steps:
        assert len(step["penalized"]) == 1
        pen = keys_of(step["penalized"][0])
        assert pen and pen <= keys_of(step["obs"])            # rows of its own minibatch
        assert 1 <= len(pen) <= 3 * n_expected
        penalized_sets.append(pen)
    per_epoch = N // MINIBATCH
    first_epoch = penalized_sets[:per_epoch]
    # different minibatches, different rows (the old learner used one set for every step)
    assert all(not (a & b) for i, a in enumerate(first_epoch) for b in first_epoch[i + 1:])
    drawn = set().union(*penalized_sets)
    assert set().union(*penalized_sets[per_epoch:]) == set().union(*first_epoch) == drawn
    # the logged count of computed subspaces: each drawn row once, all in the first epoch
    assert res["shared"]["fgmf_scorpio_new_subspace_rows"].peek() == 0  # last step: reused
    # a second update draws afresh (new salt): other rows
    spy.clear()
    update(learner, batch)
    assert set().union(*(keys_of(s["penalized"][0]) for s in spy)) != drawn


def test_subspace_is_computed_once_per_drawn_row(monkeypatch):
    learner, obs_space, act_space = make_learner()
    computed = []
    real = iteration.compute_exploitable_subspace

    def counting(policy, obs, config, actions=None):
        computed.append(obs.shape[0])
        return real(policy, obs, config, actions)

    monkeypatch.setattr(iteration, "compute_exploitable_subspace", counting)
    batch = train_batch(obs_space, act_space)
    salts = []
    real_rows = FGMFPPOTorchLearner._iteration_rows

    def rows(self, module_id):
        out = real_rows(self, module_id)
        salts.append(out.salt)
        return out

    monkeypatch.setattr(FGMFPPOTorchLearner, "_iteration_rows", rows)
    update(learner, batch)
    assert len(set(salts)) == 1
    obs = torch.as_tensor(batch.policy_batches["shared"][Columns.OBS])
    scaled = learner.module["shared"].unwrapped().scale_obs(obs)
    drawn = select_keyed_rows(row_keys(scaled, salts[0]), learner._scorpio_cfg)
    # each drawn row of the train batch computed exactly once (minibatches may add the
    # at-least-one fallback row of a minibatch without a drawn row)
    assert sum(computed) >= len(drawn) and sum(computed) <= len(drawn) + N // MINIBATCH
    assert 1 <= len(computed) <= N // MINIBATCH  # only first-epoch steps compute


def test_loss_mask_rows_never_reach_a_term(spy, monkeypatch):
    learner, obs_space, act_space = make_learner(
        "fgmf", {"scorpio": {**SCORPIO, "reg_fraction": 1.0}})
    mask = np.zeros(N, bool)
    mask[::2] = True
    batch = train_batch(obs_space, act_space, mask=mask)
    obs = batch.policy_batches["shared"][Columns.OBS]
    scale = learner.module["shared"].unwrapped().scale_obs
    masked = keys_of(scale(torch.as_tensor(obs[~mask])))
    kept = keys_of(scale(torch.as_tensor(obs[mask])))
    sgam_rows = []
    real_sgam = learner_module.sgam_distillation_loss

    def sgam(filt, policy, rows, **kw):
        sgam_rows.append(rows.detach().clone())
        return real_sgam(filt, policy, rows, **kw)

    monkeypatch.setattr(learner_module, "sgam_distillation_loss", sgam)
    update(learner, batch)
    for step in spy:
        drawn = keys_of(step["drawn_from"])
        # reg_fraction 1: every unmasked row of the minibatch, no masked one; behind SGAM,
        # regularized at SGAM(row) (the encoder's input), one penalized row per drawn row
        assert drawn == keys_of(step["obs"]) and drawn <= kept and not drawn & masked
        assert step["transform"] is not None and len(step["penalized"][0]) == len(drawn)
    assert sgam_rows and all(not keys_of(r) & masked for r in sgam_rows)


def test_terms_are_logged_once_per_module_under_fgmf_keys():
    learner, obs_space, act_space = make_learner("fgmf+adv", {
        "scorpio": dict(SCORPIO), "adv": {"steps": 1, "max_reg_samples": 4}})
    res = update(learner, train_batch(obs_space, act_space))["shared"]
    keys = {k for k in res if k.startswith("fgmf_")}
    assert {"fgmf_scorpio_R", "fgmf_scorpio_reg_samples", "fgmf_scorpio_new_subspace_rows",
            "fgmf_sgam_distill_loss", "fgmf_extra_loss"} <= keys
    assert any(k.startswith("fgmf_") and "kl" in k for k in keys), keys
    r = res["fgmf_scorpio_R"].peek()
    assert r > 0 and res["fgmf_extra_loss"].peek() >= r


def test_sgam_head_learns_from_distillation_only():
    """The policy loss sees SGAM with its mask detached: without distillation the head's
    weights stay exactly where they were, while the encoder trains."""
    learner, obs_space, act_space = make_learner(
        "sgam", {"sgam": {"distill_weight": 0.0}})
    net = learner.module["shared"].unwrapped().net
    head = {k: v.detach().clone() for k, v in net.input_filter.head.state_dict().items()}
    enc = {k: v.detach().clone() for k, v in net.encoder.state_dict().items()}
    update(learner, train_batch(obs_space, act_space))
    assert all(torch.equal(v, net.input_filter.head.state_dict()[k]) for k, v in head.items())
    assert any(not torch.equal(v, net.encoder.state_dict()[k]) for k, v in enc.items())
    assert not net.input_filter._detached  # only inside the SGD step
    learner, _, _ = make_learner("sgam", {"sgam": {"distill_weight": 1.0}})
    net = learner.module["shared"].unwrapped().net
    head = {k: v.detach().clone() for k, v in net.input_filter.head.state_dict().items()}
    update(learner, train_batch(obs_space, act_space))
    assert any(not torch.equal(v, net.input_filter.head.state_dict()[k]) for k, v in head.items())


def test_scorpio_behind_sgam_regularizes_what_the_encoder_sees(spy):
    """fgmf: R is evaluated at z = SGAM(x) of the drawn rows (the head is frozen here: no
    distillation, and the policy loss does not reach it), with SGAM bypassed."""
    learner, obs_space, act_space = make_learner(
        "fgmf", {"scorpio": {**SCORPIO, "reg_fraction": 1.0}, "sgam": {"distill_weight": 0.0}})
    update(learner, train_batch(obs_space, act_space))
    sgam = learner.module["shared"].unwrapped().net.input_filter
    for step in spy:
        with torch.no_grad():
            z = sgam.filter(step["drawn_from"]).clamp(0, 1)
        pen = step["penalized"][0]
        assert keys_of(pen) == keys_of(z) or torch.allclose(
            pen[torch.argsort(pen.flatten(1).sum(1))], z[torch.argsort(z.flatten(1).sum(1))],
            atol=1e-6)
        assert not torch.equal(z, step["drawn_from"])  # the filter changed the rows


def test_distillation_targets_once_per_drawn_row(monkeypatch):
    learner, obs_space, act_space = make_learner(
        "sgam", {"sgam": {"distill_fraction": 0.25}})
    computed, distilled = [], []
    real_target = learner_module.distillation_target
    real_loss = learner_module.sgam_distillation_loss

    def target(sgam, policy, obs, actions=None):
        computed.append(keys_of(obs))
        return real_target(sgam, policy, obs, actions)

    def loss(sgam, policy, rows, **kw):
        assert kw["target"].shape == rows.shape[:3]
        distilled.append(keys_of(rows))
        return real_loss(sgam, policy, rows, **kw)

    monkeypatch.setattr(learner_module, "distillation_target", target)
    monkeypatch.setattr(learner_module, "sgam_distillation_loss", loss)
    update(learner, train_batch(obs_space, act_space))
    per_epoch = N // MINIBATCH
    assert len(distilled) == EPOCHS * per_epoch and len(computed) <= per_epoch
    everything = set().union(*computed)
    assert sum(len(c) for c in computed) == len(everything)  # each row's target once
    assert set().union(*distilled) == everything
    # the same rows in every epoch (a keyed draw), about distill_fraction of each minibatch
    assert set().union(*distilled[per_epoch:]) == set().union(*distilled[:per_epoch])
    assert learner._distill_cache == {}  # dropped after the update


def test_gae_value_pass_runs_without_a_graph_and_the_loss_with_one(monkeypatch):
    # the learner connector's value pass (GAE) is data, not a loss: no autograd graph
    # (issue 14); the loss's values (given embeddings) keep theirs
    from agents.rl_module import FGMFTorchRLModule
    seen: list[tuple[bool, bool]] = []
    real = FGMFTorchRLModule.compute_values

    def spy(self, batch, embeddings=None):
        seen.append((embeddings is None, torch.is_grad_enabled()))
        return real(self, batch, embeddings)

    monkeypatch.setattr(FGMFTorchRLModule, "compute_values", spy)
    cfg = TrainConfig(env="beacon", defense="fgmf", train_batch_size=N, minibatch_size=MINIBATCH,
                      num_epochs=1, seed=0, defense_settings={"scorpio": dict(SCORPIO)})
    algo = build_algo_config(cfg).build_algo()
    try:
        algo.train()
    finally:
        algo.stop()
    gae = [grad for alone, grad in seen if alone]
    loss = [grad for alone, grad in seen if not alone]
    assert gae and not any(gae), seen
    assert loss and all(loss), seen


def test_rows_pending_at_an_iterations_end_are_penalized_in_the_next(monkeypatch):
    # one SGD step per iteration and reg_every=2: without the carry-over no step would ever
    # evaluate R (a silent no-op defence); with it, every second iteration does, on both
    # iterations' rows
    learner, obs_space, act_space = make_learner(
        settings={"scorpio": {**SCORPIO, "reg_every": 2}})
    evaluated = []
    real = iteration.scorpio_regularizer

    def reg(policy, obs, config, subspace=None):
        evaluated.append(len(subspace))
        return real(policy, obs, config, subspace=subspace)

    monkeypatch.setattr(iteration, "scorpio_regularizer", reg)
    for seed in range(4):
        learner.update(batch=train_batch(obs_space, act_space, seed=seed), minibatch_size=N,
                       num_epochs=1, timesteps={"num_env_steps_sampled_lifetime": N})
    assert len(evaluated) == 2, evaluated
    assert all(n >= 2 for n in evaluated), evaluated  # at least one row from each iteration
