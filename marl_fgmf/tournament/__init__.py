"""Adversarial tournaments: every defender against every attacker, on Ray, resumable.

A tournament plays each **match** ``(defender, attacker, eps, seed)``: the defender's policy
(a trained checkpoint, loaded with :func:`agents.load_policy`) is rolled out in its environment
for ``episodes`` episodes with every agent's observation perturbed by the attacker
(:func:`attacks.evaluate`). A **clean** pseudo-attacker per defender and seed gives the
unattacked return. Each match is one Ray task (DESIGN.md section 2: local Ray by default,
``address=`` for a cluster, no home-made scheduler); the driver keeps at most
``max_concurrency`` of them in flight and, as results arrive (``ray.wait``), appends each
finished match to ``DIR/matches.jsonl`` as ONE line, written with a single ``os.write`` on an
``O_APPEND`` descriptor and ``fsync`` ed.

Reruns: every record carries a **fingerprint**, a sha256 over everything that decides the
match: the defender's weights (``defender_hash``: every module's class and ``state_dict``, as
loaded, so a retrained defender differs even in the same checkpoint folder), its
``policy_id``, the env and its settings, ``episodes``, seed, eps, and the attacker (kind,
attack, settings; a learned adversary's weights and settings). Rerunning a tournament reuses a
finished record only if its fingerprint equals the current one, so a killed tournament loses
at most the matches in flight. A record with another fingerprint (settings or weights
changed), or none (an older log), is replayed: it is first moved from ``matches.jsonl`` to
``DIR/matches.stale.jsonl`` (never silently dropped; the log holds one record per match). One
line reports ``N reused, M replayed (settings changed), K new``. Records of defenders or
attackers no longer in the config stay in the log untouched and are not shown. A corrupt or
truncated line (a crash mid-write on a filesystem without atomic appends) is reported with its
line number, moved to ``DIR/matches.corrupt.txt`` and its match is played again.

A defender with an input filter (SGAM, a quantizer) is always evaluated with adaptive attacks
through it (DESIGN.md section 3): when the config lists no BPDA (or no EOT) attacker, the
tournament adds ``bpda`` = BPDA(PGD) and ``eot`` = EOT(BPDA(PGD)) for that defender (the PGD
with the settings of the config's ``pgd`` attacker), marked ``added`` in its match records, the
leaderboard and the report (:mod:`marl_fgmf.tournament.adaptive`).

Then, per defender, the gradient-masking audit (:func:`marl_fgmf.audit.audit`, also a Ray
task) on observations from the defender's own environment, stored in
``DIR/audit_<defender>.json`` with its own fingerprint (the defender's weights, env, env
settings, ``policy_id`` and the audit settings): it is rerun when that changes, and an audit of
other weights or settings is never shown. Last the leaderboard: defenders ranked by **robust
return**, the minimum over the attack ensemble of the mean team return (DESIGN.md section 3),
per eps, with the clean return beside it and flagged defenders marked. Outputs (all written
atomically)::

    DIR/matches.jsonl          one JSON object per finished match
    DIR/matches.stale.jsonl    records replaced because their fingerprint changed
    DIR/audit_<defender>.json  the audit of each defender
    DIR/leaderboard.json/.md   the ranking, per-eps robust returns, every cell
    DIR/heatmap_<eps>.png      defenders x attackers team return, one per eps
    DIR/robust_vs_eps.png      robust return against eps, one curve per defender
    DIR/report.md              all of the above tied together with the audit tables
    DIR/defenders/<name>/      defenders given as training specs, trained first

On a Ray cluster (``address``) weights travel and paths do not: the driver loads every
defender and learned adversary once and ships it through Ray's object store, so the nodes
need this package (a shared install or ``runtime_env``) but not the driver's files. The match
log and the reports are written by the driver only; every record names the Ray node that
played it (``node_id``), and ``report.md`` lists the nodes. A node whose last
``max_node_failures`` tasks failed with the same cause gets no more work while another node is
healthy, and its failed tasks are played elsewhere.

The configuration (YAML or JSON; relative paths are relative to the config file's folder)::

    env: beacon                 # optional: override every defender's env (else its run.json)
    env_kwargs: {}              # optional
    episodes: 5
    seeds: [0, 1]
    eps: [4/255, 8/255]
    defenders:
      - {name: ppo, checkpoint: runs/ppo}
      - {name: fgmf, train: {defense: fgmf, iterations: 20}}   # trained into DIR/defenders/fgmf
      - {name: ppo2, checkpoint: runs/ppo2,                    # with attackers of its own
         attackers: [{name: paad, adversary: runs/paad-vs-ppo2}]}
    attackers:
      - fgsm                                                   # name = attack, default settings
      - {name: pgd20, attack: pgd, settings: {steps: 20}}
      - {name: square, attack: square, settings: {n_queries: 200}}
      - {name: rl-adv, adversary: runs/adv}                    # a learned adversary run
      - {name: ta-pgd, external: "torchattacks:PGD", settings: {steps: 10}}   # third-party
    audit: {eps: 8/255, n_obs: 64}                             # or false
    num_cpus_per_match: 1
    max_concurrency: 2          # matches in flight (default: the cluster's CPUs / num_cpus)

A defender's own ``attackers`` (same format) play that defender only, after the config's:
a learned adversary trained against it, say. The same name may serve several defenders (one
column of the leaderboard, each defender against its own adversary).

An ``external`` attacker names, by import path, a torchattacks ``Attack`` class (built as
``cls(model, eps=<eps>, **settings)``) or a factory called as ``factory(eps=<eps>,
**settings)`` returning a torchattacks ``Attack`` or a function ``obs -> adversarial obs``
(:func:`attacks.build_external`). The match's eps is its budget: the output of every call is
checked against that ball (``norm: linf|l2``, default the torchattacks attack's own, else
linf) and a violation fails the match, never clipped. The config check imports and builds it
(one line if it does not); the fingerprint holds the import path, the settings, the norm and
:func:`attacks.external_code_id` (the named module's source hash and its package's version:
editing that module replays the matches; edits in the modules it imports are not seen).

Example::

    >>> cfg = TournamentConfig.from_file("tournament.yaml")
    >>> result = run_tournament(cfg, "results/t1", workers=2)
    >>> print(format_leaderboard(result.leaderboard))

Modules: :mod:`~marl_fgmf.tournament.config` (the schema and its parsing),
:mod:`~marl_fgmf.tournament.checks` (checks against envs, checkpoints and attacks before any
match), :mod:`~marl_fgmf.tournament.matchlog` (``matches.jsonl``),
:mod:`~marl_fgmf.tournament.specs` (weights loaded and shipped once, task specs,
fingerprints), :mod:`~marl_fgmf.tournament.adaptive` (BPDA/EOT added for input filters), :mod:`~marl_fgmf.tournament.tasks` (what Ray workers run),
:mod:`~marl_fgmf.tournament.driver` (:func:`run_tournament`),
:mod:`~marl_fgmf.tournament.leaderboard` and :mod:`~marl_fgmf.tournament.report`;
:mod:`~marl_fgmf.tournament.errors` holds the exceptions.
"""
from __future__ import annotations

from marl_fgmf.protocol import eps_label, eps_slug
from marl_fgmf.tournament.config import (AttackerSpec, AuditSpec, DefenderSpec, Match,
                                         TournamentConfig)
from marl_fgmf.tournament.driver import TournamentResult, run_tournament
from marl_fgmf.tournament.errors import ConfigError, TournamentError
from marl_fgmf.tournament.leaderboard import build_leaderboard, format_leaderboard
from marl_fgmf.tournament.matchlog import MatchLog
from marl_fgmf.tournament.report import write_outputs
from marl_fgmf.tournament.tasks import audit_defender, play_match

__all__ = [
    "AttackerSpec", "AuditSpec", "ConfigError", "DefenderSpec", "Match", "MatchLog",
    "TournamentConfig", "TournamentError", "TournamentResult", "audit_defender",
    "build_leaderboard", "eps_label", "eps_slug", "format_leaderboard", "play_match",
    "run_tournament", "write_outputs",
]
