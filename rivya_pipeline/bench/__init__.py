"""`rivya-pipeline bench {poll,transfer,e2e,calls,all} [--json] [--quick]`: the issue-5 benchmarks.

Each benchmark runs its baseline in the same run (the machines here are shared and noisy, so only
side-by-side ratios mean something) against servers in processes of their own (see `stack`).
`--quick` shrinks every benchmark so CI can check that they run and report sane figures.
"""
