"""The planner: latency models, a discrete-event simulator of disaggregated and colocated
deployments, and the placement search that picks the plan with the best per-GPU goodput.

Pure Python and numpy: nothing under distserve.planner imports torch, except
profile_engine (the `distserve profile` measurement), which is imported only when asked for.
"""
