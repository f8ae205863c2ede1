"""The synthetic shapes world: a CPU-sized GenEval stand-in where the tiny UMM learns and is scored.

shapes.py          the renderer, the scene sampler, the prompt sets (prompts/*) and the pixel oracle
geneval_rules.py   GenEval's verdict rules, one engine for the oracle and eval_geneval.py's detector
make_tiny_umm.py   the recipe that trains checkpoints/tiny-umm*, and its understanding measurements
"""
