"""`rivya-pipeline bench {poll,transfer,e2e,calls,qc,scale,chaos,growth,all} [--json] [--quick]`: the benchmarks.

Each benchmark runs its baseline in the same run (on a shared, noisy machine only side-by-side ratios mean
something) against servers in processes of their own (see `stack`). `--quick` shrinks every benchmark so CI
can check that they run and report sane figures. The README's Benchmarks section holds the latest figures.
"""

# The benchmarks, in the order `all` runs them; each is the module of that name, run by its `run(stack, quick)`.
BENCHMARKS = ("poll", "transfer", "e2e", "calls", "qc", "scale", "chaos", "growth")
# The instance profiles `bench scale` measures (bench/scale.py), each where this machine can run it.
SCALE_PROFILES = ("default", "celery")
