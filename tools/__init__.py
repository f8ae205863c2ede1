"""What sits around gvu.py: the run folder's bookkeeping and everything the method itself does not
need.

runio.py         gvu.py's inputs and run folder: one-line input errors, atomic writes, lock, resume
loggers.py       sample grids and the optional trackers (--report-to tensorboard | wandb)
distributed.py   torchrun: data-parallel GvU over DistributedDataParallel
bench.py         speed and memory as ratios in one run, and the GPU rehearsal
experiments.py   audit, reward curve, grid, the pixel-oracle RL baseline (with DAPO's dynamic
                 sampling), the token view, the where probe
vlm_judge.py     GenEval++'s VLM judge (a local transformers VLM or an OpenAI-compatible server)
"""
