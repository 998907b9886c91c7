"""Antidistillation sampling: steer the teacher's sampled traces away from what teaches a student.

``sampler.AntidistillSampling`` is the sampling defense (type ``antidistill``); ``gradient`` computes and
stores the proxy student's loss gradient once, with its provenance; ``proxy.PerturbedPair`` runs the two
perturbed proxy copies with their KV caches.
"""
