"""Optional experiment trackers for gvu.py (--report-to none | tensorboard | wandb).

log.jsonl and the sample PNGs stay the record of a run; a tracker gets a copy of every log.jsonl scalar and
every sample grid. Each backend is imported only when chosen and is not a requirement of the project:
    pip install tensorboard     # then: tensorboard --logdir OUT/tensorboard
    pip install wandb           # WANDB_MODE=offline works without network (then: wandb sync OUT/wandb/offline-run-*)
Only the main process logs: make_logger hands every other process (and --report-to none) a no-op stand-in, so
the training loop calls logger.scalars / logger.image unconditionally.
"""
import importlib
import os

import numpy as np

from adapters import InputError

BACKEND_MODULE = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb"}  # what --report-to imports


def require(report_to):
    """Refuse a chosen but missing backend in one line, before anything is loaded or written."""
    if report_to == "none":
        return
    try:
        importlib.import_module(BACKEND_MODULE[report_to])
    except ImportError:
        raise InputError(f"--report-to {report_to} needs the {report_to} package: pip install {report_to}") from None


class NoLogger:
    """--report-to none, and every process but the main one: each call does nothing."""
    def scalars(self, row, step): pass
    def image(self, tag, image, step): pass
    def close(self): pass


class TensorBoardLogger:
    """Event files in OUT/tensorboard; on --resume, events at or after the resumed step are dropped (purge_step)."""
    def __init__(self, out, start_step):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(os.path.join(out, "tensorboard"), purge_step=start_step or None)

    def scalars(self, row, step):
        for key, value in row.items():
            if key != "step":
                self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a killed run keeps what it logged

    def image(self, tag, image, step):
        self.writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")
        self.writer.flush()

    def close(self):
        self.writer.close()


class WandbLogger:
    """A wandb run named after OUT, files under OUT/wandb; a resumed gvu run starts a new wandb run."""
    def __init__(self, out, config):
        import wandb
        self.wandb = wandb
        self.run = wandb.init(project="gvu", name=os.path.basename(os.path.normpath(out)), dir=out, config=config)

    def scalars(self, row, step):
        self.run.log({k: v for k, v in row.items() if k != "step"}, step=step)

    def image(self, tag, image, step):
        self.run.log({tag: self.wandb.Image(image)}, step=step)

    def close(self):
        self.run.finish()


def make_logger(report_to, out, config, start_step=0, is_main=True):
    """The tracker for this process: the real one on the main process only (torchrun: is_main = rank 0)."""
    if report_to == "none" or not is_main:
        return NoLogger()
    if report_to == "tensorboard":
        return TensorBoardLogger(out, start_step)
    return WandbLogger(out, config)
