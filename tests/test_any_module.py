"""FGMF on any RLlib module (issue 9, part 4): the FGMF learner, SGAM in front of any encoder,
build-time checks and the ReLU curvature warning, on RLlib's own default PPO module.

The configs are RLlib's own ``PPOConfig`` with its default catalog encoder
(``DefaultPPOTorchRLModule``) on beacon; the toolkit adds only the learner class and its
``learner_config_dict`` (``agents.defenses.build_defense_settings``) and, for SGAM, the module
class with the mixin (``agents.sgam_module.SGAMDefaultPPOTorchRLModule``).
"""
from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from ray.rllib.algorithms.ppo import PPOConfig
from ray.rllib.algorithms.ppo.torch.default_ppo_torch_rl_module import DefaultPPOTorchRLModule
from ray.rllib.algorithms.ppo.torch.ppo_torch_learner import PPOTorchLearner
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch

import agents.learner as learner_module
from agents import load_policy
from agents.checkpoint import FilteredModulePolicy, rl_module_policy
from agents.defenses import build_defense_settings
from agents.learner import FGMFModuleError, FGMFPPOTorchLearner, fgmf_view
from agents.sgam_module import SGAMDefaultPPOTorchRLModule
from attacks import BPDA, PGD
from envs.rllib import register_rllib_env
from marl_fgmf.attribution import find_cam_layer, grad_cam_plus_plus
from marl_fgmf.audit import has_input_filter
from marl_fgmf.sgam import SGAM
from rllib_frames import UnitFrames

pytestmark = pytest.mark.usefixtures("one_thread")

ENV_KWARGS = {"n_agents": 2, "max_steps": 10}
MODULE_ID = "ppo_policy"
SMOOTH = {"conv_filters": [[8, [3, 3], 2], [16, [3, 3], 2]], "head_fcnet_hiddens": [16],
          "conv_activation": "silu", "head_fcnet_activation": "silu"}
RELU = {"conv_filters": [[8, [3, 3], 2], [16, [3, 3], 2]], "head_fcnet_hiddens": [16]}
# beacon frames are uint8; RLlib's default encoder needs floats: the module observes [0, 1]
OBS_SPACE = gym.spaces.Box(0.0, 1.0, (21, 21, 3), np.float32)
ACT_SPACE = gym.spaces.Discrete(5)
N, MINIBATCH = 64, 32


def module_spec(module_class=DefaultPPOTorchRLModule, model_config=SMOOTH, sgam=None):
    config = dict(model_config)
    if sgam is not None:
        config["sgam"] = sgam
    return RLModuleSpec(module_class=module_class, observation_space=OBS_SPACE,
                        action_space=ACT_SPACE, model_config=config)


def ppo_config(defense: str, module_class=DefaultPPOTorchRLModule, model_config=SMOOTH,
               settings: dict | None = None) -> PPOConfig:
    """RLlib's own PPOConfig, default catalog encoder; the FGMF learner for ``defense``."""
    d = build_defense_settings(defense, settings)
    spec = RLModuleSpec(module_class=module_class,
                        model_config={**model_config, **({"sgam": d["sgam"]} if d["sgam"]
                                                         is not None else {})})
    return (PPOConfig()
            .environment(env=register_rllib_env("beacon", **ENV_KWARGS))
            .multi_agent(policies={MODULE_ID},
                         policy_mapping_fn=lambda agent_id, episode, **kw: MODULE_ID,
                         count_steps_by="agent_steps")
            .env_runners(num_env_runners=0, num_envs_per_env_runner=1,
                         env_to_module_connector=lambda env, spaces=None, device=None:
                         UnitFrames())
            .training(train_batch_size_per_learner=N, minibatch_size=MINIBATCH, num_epochs=1)
            .rl_module(rl_module_spec=spec)
            .learners(learner_class=FGMFPPOTorchLearner, learner_config_dict=d["learner_config"])
            .debugging(seed=0, log_level="ERROR"))


def frames(n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.rand((n, 21, 21, 3), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- SGAM mixin
def test_sgam_mixin_filters_each_forward_once_and_serves_the_protocol():
    module = module_spec(SGAMDefaultPPOTorchRLModule, sgam={"keep": 0.5}).build()
    assert isinstance(module.input_filter, SGAM)
    calls = []
    module.input_filter.register_forward_hook(lambda *a: calls.append(1))
    obs = frames()
    for fn in (module.forward_inference, module.forward_exploration, module.forward_train,
               module.compute_values):
        calls.clear()
        fn({Columns.OBS: obs})
        assert len(calls) == 1, fn.__name__
    # the layer changes what the encoder sees (keep < 1), and load_policy's view equals the module
    policy = rl_module_policy(module)
    assert isinstance(policy, FilteredModulePolicy) and policy.input_filter is module.input_filter
    assert has_input_filter(policy)
    out = module.forward_inference({Columns.OBS: obs})[Columns.ACTION_DIST_INPUTS]
    calls.clear()
    assert torch.allclose(policy(obs), out, atol=1e-6) and len(calls) == 1
    with module.without_input_filter():
        raw = module.forward_inference({Columns.OBS: obs})[Columns.ACTION_DIST_INPUTS]
    assert not torch.allclose(raw, out, atol=1e-6)
    with module.input_filter.bypassed():
        assert torch.allclose(policy(obs), raw, atol=1e-6)


def test_bpda_through_the_mixin_swaps_the_modules_own_sgam():
    module = module_spec(SGAMDefaultPPOTorchRLModule, sgam={"keep": 0.5}).build()
    policy = rl_module_policy(module).eval()
    obs = frames(4)
    original = policy.input_filter
    grad_enabled: list[bool] = []
    hook = original.register_forward_hook(lambda *a: grad_enabled.append(torch.is_grad_enabled()))
    pgd = PGD(policy, eps=8 / 255, alpha=2 / 255, steps=3, random_start=False)
    pgd(obs)
    assert any(grad_enabled)  # plain PGD differentiates through SGAM
    grad_enabled.clear()
    adv = BPDA(pgd)(obs)
    hook.remove()
    # BPDA: SGAM only ran inside StraightThrough's no-grad forward (its backward is identity)
    assert grad_enabled and not any(grad_enabled)
    assert policy.input_filter is original  # restored
    assert 0 < float((adv - obs).abs().max()) <= 8 / 255 + 1e-6


def test_probe_finds_the_actor_feature_map_of_rllibs_default_encoder():
    shared = module_spec().build()  # RLlib 2.60 default: vf_share_layers=True
    layer = find_cam_layer(rl_module_policy(shared))
    assert next(n for n, m in shared.named_modules() if m is layer).startswith("encoder.")
    module = module_spec(model_config={**SMOOTH, "vf_share_layers": False}).build()
    policy = rl_module_policy(module)
    layer = find_cam_layer(policy)
    name = next(n for n, m in module.named_modules() if m is layer)
    assert "actor_encoder" in name, name  # never the critic's separate encoder
    maps = grad_cam_plus_plus(policy, frames(3), normalize=True, upsample=True)
    assert maps.shape == (3, 21, 21) and bool(torch.isfinite(maps).all())
    assert float(maps.amax()) > 0


# --------------------------------------------------------------------------- learner view
def test_view_of_a_default_module_scales_like_load_policy_and_refuses_what_it_cannot_serve():
    module = module_spec().build()
    policy, to_unit = fgmf_view(module, MODULE_ID, ("scorpio",))
    obs = frames(3)
    assert torch.equal(to_unit(obs), obs)  # a [0, 1] space: as is
    assert torch.allclose(policy(obs), module._forward({Columns.OBS: obs})
                          [Columns.ACTION_DIST_INPUTS])
    with pytest.raises(FGMFModuleError, match=r"needs SGAM in front of module 'm'.*"
                                              r"SGAMInputMixin") as err:
        fgmf_view(module, "m", ("scorpio", "sgam"))
    assert "\n" not in str(err.value)
    uint8 = RLModuleSpec(module_class=DefaultPPOTorchRLModule,
                         observation_space=gym.spaces.Box(0, 255, (21, 21, 3), np.uint8),
                         action_space=ACT_SPACE, model_config=SMOOTH).build()
    _, to_unit = fgmf_view(uint8, "u", ("adv",))
    raw = torch.randint(0, 256, (2, 21, 21, 3), dtype=torch.uint8)
    assert torch.allclose(to_unit(raw), raw.float() / 255)
    boxed = RLModuleSpec(module_class=DefaultPPOTorchRLModule,
                         observation_space=gym.spaces.Box(-1.0, 1.0, (21, 21, 3), np.float32),
                         action_space=ACT_SPACE, model_config=SMOOTH).build()
    with pytest.raises(FGMFModuleError, match=r"values in \[-1, 1\]"):
        fgmf_view(boxed, "b", ("scorpio",))


def test_relu_network_warns_once_smooth_network_does_not(monkeypatch):
    monkeypatch.setattr(learner_module, "_WARNED", set())
    with pytest.warns(RuntimeWarning, match="piecewise linear.*conv_activation='silu'"):
        fgmf_view(module_spec(model_config=RELU).build(), "relu", ("scorpio",))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fgmf_view(module_spec(model_config=RELU).build(), "relu", ("scorpio",))  # once
        fgmf_view(module_spec(model_config=RELU).build(), "relu", ("adv",))  # no SCOR-PIO
        fgmf_view(module_spec().build(), "smooth", ("scorpio",))


# --------------------------------------------------------------------------- learner
def local_learner(defense: str, module_class=DefaultPPOTorchRLModule, settings=None):
    config = ppo_config(defense, module_class, settings=settings)
    spaces = {"__env__": (OBS_SPACE, ACT_SPACE), MODULE_ID: (OBS_SPACE, ACT_SPACE)}
    learner = config.build_learner(env=None, spaces=spaces)
    learner.build()
    return learner


def batch(seed: int = 0) -> MultiAgentBatch:
    rng = np.random.default_rng(seed)
    data = {Columns.OBS: rng.random((N, 21, 21, 3)).astype(np.float32),
            Columns.ACTIONS: rng.integers(0, 5, N),
            Columns.ACTION_LOGP: np.full(N, -np.log(5), dtype=np.float32),
            Columns.ACTION_DIST_INPUTS: np.zeros((N, 5), np.float32),
            "advantages": rng.standard_normal(N).astype(np.float32),
            "value_targets": rng.standard_normal(N).astype(np.float32),
            Columns.VF_PREDS: np.zeros(N, np.float32), Columns.LOSS_MASK: np.ones(N, bool)}
    return MultiAgentBatch({MODULE_ID: SampleBatch(data)}, env_steps=N)


@pytest.mark.parametrize("defense", ["scorpio", "fgmf"])
def test_learner_loss_on_a_default_module_is_ppo_plus_r_in_the_gradient(defense, monkeypatch):
    settings = {"scorpio": {"reg_fraction": 0.25, "lambda_curv": 1e5, "lambda_grad": 1e5,
                            "reg_every": 1}}  # R at every step, each one checked
    module_class = SGAMDefaultPPOTorchRLModule if defense == "fgmf" else DefaultPPOTorchRLModule
    learner = local_learner(defense, module_class, settings)
    checked = []
    real = FGMFPPOTorchLearner.compute_loss_for_module

    def check(self, **kw):
        total = real(self, **kw)
        ppo = PPOTorchLearner.compute_loss_for_module(self, **kw)
        params = [p for p in self.module[MODULE_ID].parameters() if p.requires_grad]
        g_total = torch.autograd.grad(total, params, retain_graph=True, allow_unused=True)
        g_ppo = torch.autograd.grad(ppo, params, retain_graph=True, allow_unused=True)
        diff = sum(float(((a if a is not None else 0) - (b if b is not None else 0))
                         .abs().sum()) for a, b in zip(g_total, g_ppo)
                   if a is not None or b is not None)
        checked.append((float(total.detach()), float(ppo.detach()), diff))
        return total

    monkeypatch.setattr(FGMFPPOTorchLearner, "compute_loss_for_module", check)
    head = {k: v.clone() for k, v in learner.module[MODULE_ID].state_dict().items()
            if k.startswith("input_filter.")}
    results = learner.update(batch=batch(), minibatch_size=MINIBATCH, num_epochs=1,
                             shuffle_batch_per_epoch=True,
                             timesteps={"num_env_steps_sampled_lifetime": N})
    assert len(checked) == N // MINIBATCH
    for total, ppo, diff in checked:
        assert total > ppo and diff > 0  # R > 0 and in the gradient
    stats = results[MODULE_ID] if isinstance(results, dict) else results
    assert stats is not None
    if defense == "fgmf":
        after = learner.module[MODULE_ID].state_dict()
        assert any(not torch.equal(head[k], after[k]) for k in head if "head" in k)


@pytest.mark.parametrize("module_class,defense,needle", [
    (DefaultPPOTorchRLModule, "fgmf", "SGAMInputMixin"),
    (DefaultPPOTorchRLModule, "sgam", "SGAMInputMixin"),
])
def test_learner_build_fails_on_one_line_naming_the_module(module_class, defense, needle):
    with pytest.raises(FGMFModuleError, match=needle) as err:
        local_learner(defense, module_class)
    assert MODULE_ID in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------- real training
@pytest.mark.slow
@pytest.mark.parametrize("defense", ["scorpio", "fgmf"])
def test_rllib_ppo_config_trains_an_iteration_with_the_fgmf_learner(defense, ray_session,
                                                                    tmp_path):
    module_class = SGAMDefaultPPOTorchRLModule if defense == "fgmf" else DefaultPPOTorchRLModule
    algo = ppo_config(defense, module_class).build_algo()
    try:
        result = algo.train()
        ckpt = tmp_path / "ckpt"
        algo.save_to_path(str(ckpt))
        module = algo.get_module(MODULE_ID)
    finally:
        algo.stop()
    stats = result["learners"][MODULE_ID]
    assert np.isfinite(stats["fgmf_scorpio_R"]) and stats["fgmf_scorpio_R"] > 0
    assert stats["fgmf_scorpio_mask_fraction"] > 0
    if defense == "fgmf":
        assert np.isfinite(stats["fgmf_sgam_distill_loss"])
    # the checkpoint serves the protocol: load_policy's logits equal the trained module's
    policy = load_policy(ckpt, device="cpu")
    assert isinstance(policy, FilteredModulePolicy) == (defense == "fgmf")
    obs = frames(4)
    want = module.forward_inference({Columns.OBS: obs})[Columns.ACTION_DIST_INPUTS]
    assert torch.allclose(policy(obs), want.cpu(), atol=1e-5)
