"""The ``postgres_url`` fixture (tests/postgres_server.py) is a real PostgreSQL server: an Optuna
study written through it in this process is read back by another process."""
from __future__ import annotations

import subprocess
import sys

import optuna

from postgres_server import postgres_url  # noqa: F401

READ_BACK = """
import sys
import optuna
optuna.logging.set_verbosity(optuna.logging.WARNING)
study = optuna.load_study(study_name="x", storage=sys.argv[1])
complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
print(len(complete), min(t.value for t in complete))
"""


def test_optuna_study_is_shared_across_processes(postgres_url):  # noqa: F811
    assert postgres_url.startswith("postgresql+psycopg://postgres@127.0.0.1:")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=postgres_url, study_name="x",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda trial: (trial.suggest_float("x", -1.0, 1.0) - 0.25) ** 2, n_trials=5)
    best = study.best_value

    done = subprocess.run([sys.executable, "-c", READ_BACK, postgres_url], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    count, value = done.stdout.split()
    assert int(count) == 5
    assert float(value) == best
