"""The thread budget (agents.threads): every process uses the CPUs it was given, never more.

Unit checks of the budget's sources (MARL_FGMF_CPUS, Ray's assignment, the machine) and of the
bad-input line, then the real thing: the env runners of an RLlib algorithm and a Ray task with
num_cpus=1 run torch with one thread, the FGMF learner never with more than its budget.
"""
from __future__ import annotations

import pytest
import torch

from agents.threads import ENV_VAR, apply_thread_budget, cpu_budget, machine_cpus


@pytest.fixture
def threads_restored():
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


def test_env_var_sets_the_budget_capped_at_the_machine(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "1")
    assert cpu_budget() == 1
    monkeypatch.setenv(ENV_VAR, str(10 ** 4))
    assert cpu_budget() == machine_cpus()
    monkeypatch.delenv(ENV_VAR)
    assert cpu_budget() == machine_cpus()  # the driver, not a Ray task: the machine


@pytest.mark.parametrize("bad", ["0", "-2", "two", "1.5"])
def test_bad_env_var_is_one_line(monkeypatch, bad):
    monkeypatch.setenv(ENV_VAR, bad)
    with pytest.raises(ValueError, match=rf"^MARL_FGMF_CPUS must be a whole number of CPUs >= 1 or 'all', got '{bad}'$"):
        cpu_budget()


def test_apply_caps_keeps_lower_and_sets_explicit(monkeypatch, threads_restored):
    monkeypatch.delenv(ENV_VAR, raising=False)
    torch.set_num_threads(1)
    assert apply_thread_budget() == 1 and torch.get_num_threads() == 1  # a lower count stays
    assert apply_thread_budget(10 ** 4) == machine_cpus()             # never above the machine
    monkeypatch.setenv(ENV_VAR, "1")
    assert apply_thread_budget() == 1 and torch.get_num_threads() == 1
    import os
    assert os.environ["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv(ENV_VAR, "all")  # the benchmarks' comparison arm: no budget
    assert cpu_budget() == machine_cpus() == apply_thread_budget(1) == torch.get_num_threads()


@pytest.mark.slow
def test_env_runners_tasks_and_learner_keep_their_budget(ray_session, monkeypatch,
                                                         threads_restored):
    from agents.train import TrainConfig, build_algo_config

    @ray_session.remote(num_cpus=1)
    def task_threads():
        from agents.threads import apply_thread_budget, cpu_budget
        return cpu_budget(), apply_thread_budget(), torch.get_num_threads()

    assert ray_session.get(task_threads.remote()) == (1, 1, 1)

    monkeypatch.setenv(ENV_VAR, "1")  # the driver's budget: 1 CPU
    torch.set_num_threads(machine_cpus())
    cfg = TrainConfig(env="pursuit", env_kwargs={"max_cycles": 20}, train_batch_size=500,
                      minibatch_size=250, num_epochs=1)
    algo = build_algo_config(cfg).build_algo()
    try:
        remote = algo.env_runner_group.foreach_env_runner(
            lambda runner: (runner.worker_index, torch.get_num_threads()), local_env_runner=False)
        assert len(remote) == 2 and all(n == 1 for _, n in remote), remote
        assert algo.learner_group._learner.num_threads == 1 and torch.get_num_threads() == 1
    finally:
        algo.stop()


def test_cli_refuses_a_bad_budget_before_writing(tmp_path):
    import os
    import subprocess
    import sys
    out = tmp_path / "run"
    env = {**os.environ, ENV_VAR: "two"}
    proc = subprocess.run([sys.executable, "-m", "marl_fgmf.cli", "train", "--iterations", "1",
                           "--out", str(out)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == ("marl-fgmf train: error: MARL_FGMF_CPUS must be a whole "
                                   "number of CPUs >= 1 or 'all', got 'two'")
    assert not out.exists()
