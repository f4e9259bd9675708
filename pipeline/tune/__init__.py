"""Ray Tune search over the collaborative-training knobs (lambda1, lambda2, aux heads) or any named
config field.

    from pipeline.tune.search import load_search, run_search
    result = run_search(load_search("configs/local/tune_co_heads.yaml"))

`space.py`: the search config and its space (validation, Tune domains; no Ray import); `search.py`: trials and
the Tuner; `results.py`: the table, plot, best config and MLflow parent / child runs.
"""

from pipeline.tune.space import ParamSpec, SchedulerConfig, SearchConfig, TuneJobConfig

__all__ = ["ParamSpec", "SchedulerConfig", "SearchConfig", "TuneJobConfig"]
