"""Output perturbations: defenses on what the engine returns (top-k logprobs, probability vectors).

Each is a ResponseDefense registered by type name (see defense/registry.py):

    keyed_noise      keyed, repeat-stable logit noise, argmax and top-k mass kept (the default)
    random_noise     i.i.d. noise per request (the baseline averaging defeats)
    top_k_cap        at most k alternatives
    top1_only        the top alternative only (one-hot for probability vectors)
    quantize         floor to a step or to decimal digits
    temperature      flatten or sharpen the returned distribution
    reverse_sigmoid  Lee et al.'s deceptive perturbation

``defense.perturbation.measures`` has the utility measures (top-1 agreement, TV, KL, rank correlation,
calibration error). ``defense.perturbation.ops`` has the array math, for numpy and torch alike.
"""
