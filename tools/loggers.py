"""What a gvu.py run shows besides log.jsonl: the sample grids (save_grid: each image with its
reward and the prompt's words shaded by their probability under the judge) and optional experiment
trackers (--report-to none | tensorboard | wandb).

log.jsonl and the sample PNGs stay the record of a run; a tracker gets a copy of every log.jsonl
scalar and every sample grid. Each backend is imported only when chosen and is not a requirement of
the project:
    pip install tensorboard     # then: tensorboard --logdir OUT/tensorboard
    pip install wandb           # WANDB_MODE=offline works without network,
                                # then: wandb sync OUT/wandb/offline-run-*
Only the main process logs: make_logger hands every other process (and --report-to none) a no-op
stand-in, so the training loop calls logger.scalars / logger.image unconditionally.
"""

import importlib
import math
import os

import numpy as np
from PIL import Image, ImageDraw

from models.adapters import InputError

BACKEND_MODULE = {
    "tensorboard": "torch.utils.tensorboard",
    "wandb": "wandb",
}  # what --report-to imports


def require(report_to):
    """Refuse a chosen but missing backend in one line, before anything is loaded or written."""
    if report_to == "none":
        return
    try:
        importlib.import_module(BACKEND_MODULE[report_to])
    except ImportError:
        raise InputError(
            f"--report-to {report_to} needs the {report_to} package: pip install {report_to}"
        ) from None


class NoLogger:
    """--report-to none, and every process but the main one: each call does nothing."""

    def scalars(self, row, step):
        pass

    def image(self, tag, image, step):
        pass

    def close(self):
        pass


class TensorBoardLogger:
    """Event files in OUT/tensorboard; on --resume, events at or after the resumed step are dropped
    (purge_step)."""

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
    """A wandb run named after OUT, files under OUT/wandb; a resumed run starts a new wandb run."""

    def __init__(self, out, config):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project="gvu", name=os.path.basename(os.path.normpath(out)), dir=out, config=config
        )

    def scalars(self, row, step):
        self.run.log({k: v for k, v in row.items() if k != "step"}, step=step)

    def image(self, tag, image, step):
        self.run.log({tag: self.wandb.Image(image)}, step=step)

    def close(self):
        self.run.finish()


def make_logger(report_to, out, config, start_step=0, is_main=True):
    """The tracker for this process: the real one on the main process only (torchrun: is_main = rank
    0)."""
    if report_to == "none" or not is_main:
        return NoLogger()
    if report_to == "tensorboard":
        return TensorBoardLogger(out, start_step)
    return WandbLogger(out, config)


# -----------------------------------------------------------------------------
# sample grids: what the reward sees, word by word
def token_texts(tokenizer, ids):
    """The scored answer's tokens as text, one per term of the reward."""
    return [tokenizer.decode([i]).strip() for i in ids]


def token_layout(draw, texts, token_logp, width, line=11):
    """Word-wrap one caption into `width` px: [(x, y, text, p)] with p = exp(log p_j), the reward's
    own terms."""
    boxes, x, y = [], 0, 0
    for text, logp in zip(texts, token_logp.tolist()):
        w = draw.textlength(text) + 4
        if x and x + w > width:
            x, y = 0, y + line
        boxes.append((x, y, text, math.exp(logp)))
        x += w
    return boxes


def save_grid(path, prompts, images, rewards, G, rows=4, px=96, texts=None, token_logp=None):
    """Rows = prompts, columns = the G samples, each captioned with its reward. Given the reward's
    per-token log-probs (N, L) and each prompt's token texts, every image also gets its prompt's
    tokens shaded by their probability under the judge (white = 1, red = 0) with the least likely
    one framed. Returns the grid."""
    rows = min(rows, len(prompts) // G)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = [
        token_layout(measure, texts[i], token_logp[i], px - 4) if token_logp is not None else []
        for i in range(rows * G)
    ]
    heights = [
        12 + px + 12 + max([b[1] + 12 for c in range(G) for b in boxes[r * G + c]], default=0)
        for r in range(rows)
    ]  # prompt line, images, rewards, then the longest token block of the row
    grid = Image.new("RGB", (G * px, sum(heights)), "white")
    draw = ImageDraw.Draw(grid)
    for r in range(rows):
        y = sum(heights[:r])
        draw.text((2, y + 1), prompts[r * G][: G * px // 6], fill="black")
        for c in range(G):
            i = r * G + c
            grid.paste(images[i].resize((px, px), Image.NEAREST), (c * px, y + 12))
            draw.text((c * px + 2, y + 12 + px), f"R={rewards[i]:.3f}", fill="black")
            lowest = min(boxes[i], key=lambda b: b[3], default=None)
            for box in boxes[i]:
                x0, y0, text, p = box
                x0, y0 = c * px + 2 + x0, y + 24 + px + y0
                shade = int(60 + 195 * p)  # white at p = 1, red at p = 0
                draw.rectangle(
                    [x0, y0, x0 + draw.textlength(text) + 2, y0 + 11],
                    fill=(255, shade, shade),
                    outline="black" if box is lowest else None,
                )
                draw.text((x0 + 1, y0), text, fill="black")
    grid.save(path)
    return grid
