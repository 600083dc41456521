"""Reference decode-instance timeline for the simulator tests: one step at a time."""
import numpy as np


def naive_decode(arrivals, ctx, steps, coeffs, padded=False):
    """Finish time of each request when every decode step costs a + b * S + c * B.

    S is the sum of the members' (ctx + 1), or with `padded` B * (the longest ctx + 1), as an
    engine that pads decode attention pays. Joiners enter at the next step boundary.
    """
    t, i, running, finish = 0.0, 0, {}, {}
    n = len(arrivals)
    while i < n or running:
        if not running and i < n:
            t = max(t, arrivals[i])
        while i < n and arrivals[i] <= t:
            running[i] = [ctx[i] + 1, steps[i]]
            i += 1
        a, b, c = coeffs(len(running))
        contexts = [v[0] for v in running.values()]
        s = len(contexts) * max(contexts) if padded else sum(contexts)
        t += a + b * s + c * len(running)
        for r in list(running):
            running[r][0] += 1
            running[r][1] -= 1
            if running[r][1] == 0:
                finish[r] = t
                del running[r]
    return np.array([finish[r] for r in range(n)])
