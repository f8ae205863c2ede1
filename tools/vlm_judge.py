"""GenEval++ scored the paper's way: a vision-language model judges each image against a checklist.

The protocol is the official one, from evaluation/evaluation_geneval_plus.py in the public
repository matrix0721/GvU (read at commit 0a3000a; this is our own code, only the prompt text is
theirs):

  1. each metadata line becomes an "Expectation checklist" (count, colour, size, region of each
     included object; "No more than N ... should appear" for each exclude clause),
  2. the judge gets a fixed system prompt, then one user turn: the instruction and the checklist as
     text, followed by the image as a base64 JPEG (PIL's default quality),
  3. decoding at temperature 0 with at most 200 new tokens,
  4. the answer must hold a JSON object {"correct": 0|1, "reason": ...}; a failed call or an
     unusable answer is retried, 6 attempts in all; after that the image is not evaluated
     (correct = -1).

Where we differ, on purpose: images the judge could not evaluate are left out of the accuracies and
reported as a separate share (the official script counts them as wrong); an answer whose "correct"
is not 0/1 is retried (the official script would count it as wrong); failed attempts wait
RETRY_BACKOFF_S * 2**k seconds (the official script retries at once); every attempt is one request
(the OpenAI client's own retries are off, REQUEST_TIMEOUT_S a request; the official script keeps the
client's default retries, so its 6 attempts can send up to 18 requests); authentication /
unknown-model errors stop the run instead of marking every image -1; a prompt folder without images
stops `eval_geneval.py score` before it starts (the official script counts a missing image wrong).
gvu.py's docstring lists these as departure 12, docs/reproduce_paper.md gives the evidence.

Backends (`--judge`):
  openai:MODEL  any OpenAI-compatible chat-completions endpoint, through the `openai` client
                (optional dependency); the client reads OPENAI_BASE_URL and OPENAI_API_KEY from the
                environment.
  hf:MODEL      a local transformers VLM (AutoProcessor + AutoModelForImageTextToText), the same
                messages through the processor's chat template, greedy decoding. Greedy decoding is
                deterministic, so a retry would repeat the same answer: this backend makes one
                attempt.
"""

from __future__ import annotations

import base64
import io
import json
import re
import sys
import time

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from models.adapters import dtype_kwarg, pick_device

DEFAULT_JUDGE = "openai:gpt-4.1-2025-04-14"
MAX_TOKENS = 200  # official: max_tokens=200
TEMPERATURE = 0.0  # official: temperature=0.0
ATTEMPTS = 6  # official: max_retries=6, i.e. 6 calls in all
RETRY_BACKOFF_S = 1.0  # ours: wait 1, 2, 4, 8, 16 s between attempts (tests set 0)
# ours: one HTTP request may take this long before it counts as a failed attempt
REQUEST_TIMEOUT_S = 120.0
UNEVALUATED = -1  # official: {"correct": -1, ...} once every attempt failed

# The judge's instructions, word for word as in the official script (matrix0721/GvU,
# evaluation/evaluation_geneval_plus.py, SYSTEM_PROMPT): any change moves the scores.
SYSTEM_PROMPT = """You are an expert image evaluator.

Your task is to determine whether the given image faithfully satisfies the visual instruction and the expectation checklist.

Follow these rules strictly:
1. The image must match **all** expectations, including:
   - Object classes
   - Counts of each object
   - Colors of each object
   - Spatial position within the image (e.g., "above", "below", based on real pixel position)
   - Size and relative scale of objects
2. The image must appear as a **natural, coherent, photo-like single image**.
   - Do NOT allow stylized images (e.g., cartoons, sketches, anime).
   - Do NOT allow collage-style or multi-panel images. Only one consistent, realistic scene is acceptable.
3. Be very strict and conservative in your judgment. 

Return your result as a JSON object using this format:
{
  "correct": 1 if the image fully satisfies all expectations, else 0,
  "reason": "You may explain in detail what is missing or incorrect"
}
"""  # noqa: E501 (verbatim)


class JudgeError(Exception):
    """A user-facing problem (bad --judge, missing package, rejected credentials): one line,
    non-zero exit."""


class TransientError(Exception):
    """One failed judge call that is worth another attempt (network, rate limit, server error,
    empty answer)."""


# ----------------------------------------------------------------- the checklist (official wording)


def naive_plural(name: str, count: int) -> str:
    """The official script's plural: name + 's' when count > 1 ('2 broccolis', '3 sports balls')."""
    return name + "s" if count > 1 else name


def describe_include(req: dict) -> str:
    """'red-colored larger 2 dogs located in the left part of the image' (official format_item)."""
    count = req.get("count", 1)
    noun = f"{count} {naive_plural(req['class'], count)}"
    adjectives = [f"{req['color']}-colored"] if req.get("color") else []
    adjectives += [req["size"]] if req.get("size") else []
    noun = " ".join(adjectives + [noun])
    where = (
        f"located in the {req['region']} part of the image"
        if req.get("region")
        else "present in the image"
    )
    return f"{noun} {where}"


def describe_exclude(req: dict) -> str:
    """'No more than 6 clocks should appear' for exclude {class: clock, count: 7}."""
    count = req.get("count", 1)
    return f"No more than {count - 1} {naive_plural(req['class'], count)} should appear"


def checklist(meta: dict) -> str:
    """The expectation checklist of a metadata line: '- ...' per include, then per exclude."""
    lines = [f"- {describe_include(r)}." for r in meta.get("include", [])]
    lines += [f"- {describe_exclude(r)}." for r in meta.get("exclude", [])]
    return "This image should contain:\n" + "\n".join(lines)


def user_text(meta: dict) -> str:
    """The text part of the user turn: the instruction (the prompt) and the checklist."""
    return f"Instruction:\n{meta['prompt'].strip()}\n\nExpectation checklist:\n{checklist(meta)}"


def encode_jpeg(image: Image.Image) -> str:
    """The image as base64 JPEG at PIL's default quality (as the official script sends it)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def build_messages(meta: dict, image: Image.Image) -> list[dict]:
    """OpenAI chat messages: the system prompt, then a user turn [checklist text, JPEG image]."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": user_text(meta)},
                {
                    "type": "image_url",
                    "image_url": {"url": "data:image/jpeg;base64," + encode_jpeg(image)},
                },
            ],
        },
    ]


# --------------------------------------------------------------------------- reading the answer


def extract_json(text: str) -> dict:
    """The JSON object in an answer: drop a ```json fence, then parse the outermost {...};
    ValueError if none."""
    text = re.sub(r"\s*```$", "", re.sub(r"^```json\s*", "", text.strip()))
    # greedy: from the first '{' to the last '}', as the official script
    found = re.search(r"\{[\s\S]*\}", text)
    if not found:
        raise ValueError("no JSON object in the answer")
    return json.loads(found.group(0))  # json.JSONDecodeError is a ValueError


def parse_verdict(text: str) -> tuple[int, str]:
    """(1 or 0, reason) from the judge's answer; ValueError without a {"correct": 0|1} object."""
    answer = extract_json(text)
    correct = answer.get("correct")
    if isinstance(correct, str) or correct not in (0, 1):  # bool, int or float equal to 0 / 1
        raise ValueError(f"'correct' is {correct!r}, not 0 or 1")
    return int(correct), str(answer.get("reason", ""))


def one_line(text, limit=300) -> str:
    """First line of a message, shortened: reasons and errors stay one line."""
    lines = str(text).strip().splitlines() or [""]
    return lines[0][:limit]


def judge(complete, messages, attempts=ATTEMPTS, backoff=None, sleep=time.sleep) -> tuple[int, str]:
    """Ask `complete(messages) -> answer text` until the answer parses, at most `attempts` times.
    Returns (1 | 0, the judge's reason), or (-1, why) when no attempt gave a usable answer."""
    backoff = RETRY_BACKOFF_S if backoff is None else backoff
    for attempt in range(1, attempts + 1):
        try:
            answer = complete(messages)
        except TransientError as e:
            error = f"call failed: {one_line(e)}"
        else:
            try:
                return parse_verdict(answer)
            except ValueError as e:
                error = f"unusable answer ({one_line(e)}): {one_line(answer, 120)!r}"
        print(f"judge attempt {attempt}/{attempts} failed: {error}", file=sys.stderr)
        if attempt < attempts:
            sleep(backoff * 2 ** (attempt - 1))
    return UNEVALUATED, f"not evaluated after {attempts} attempt(s); last: {error}"


# --------------------------------------------------------------------------- backends


def parse_judge_spec(spec: str) -> tuple[str, str]:
    """'openai:gpt-4.1-2025-04-14' -> ('openai', 'gpt-4.1-2025-04-14'); JudgeError if malformed."""
    backend, _, model = (spec or "").partition(":")
    if backend not in ("openai", "hf") or not model:
        raise JudgeError(f"bad --judge {spec!r}: want openai:MODEL or hf:MODEL")
    return backend, model


def openai_backend(model: str):
    """complete(messages) via an OpenAI-compatible endpoint (OPENAI_BASE_URL, OPENAI_API_KEY)."""
    try:
        import openai
    except ImportError:
        raise JudgeError("the openai judge needs the openai package: pip install openai") from None
    try:  # the client's own retries are off: every attempt is one request, counted by `judge`
        client = openai.OpenAI(max_retries=0, timeout=REQUEST_TIMEOUT_S)
    except openai.OpenAIError as e:  # e.g. no OPENAI_API_KEY
        raise JudgeError(f"cannot create the OpenAI client: {one_line(e)}") from None

    def complete(messages) -> str:
        try:
            response = client.chat.completions.create(
                model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=TEMPERATURE
            )
        except (
            openai.AuthenticationError,
            openai.PermissionDeniedError,
            openai.NotFoundError,
        ) as e:
            raise JudgeError(f"judge {model} at {client.base_url}: {one_line(e)}") from None
        # connection, timeout, rate limit, 5xx, other 4xx: another attempt
        except openai.APIError as e:
            raise TransientError(one_line(e)) from None
        if not response.choices or response.choices[0].message.content is None:
            raise TransientError("empty answer")
        return response.choices[0].message.content

    return complete


def hf_inputs(messages) -> tuple[list[dict], list[Image.Image]]:
    """OpenAI messages -> the chat-template form ({"type": "image"} placeholders), decoded JPEGs."""
    converted, images = [], []
    for message in messages:
        parts = message["content"]
        parts = [{"type": "text", "text": parts}] if isinstance(parts, str) else parts
        content = []
        for part in parts:
            if part["type"] == "image_url":
                data = part["image_url"]["url"].split(",", 1)[1]
                images.append(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))
                content.append({"type": "image"})
            else:
                content.append({"type": "text", "text": part["text"]})
        converted.append({"role": message["role"], "content": content})
    return converted, images


def hf_backend(model_name: str, device: str | None = None):
    """complete(messages) with a local transformers VLM: chat template, greedy decoding,
    MAX_TOKENS new tokens."""
    device = pick_device(device or "auto")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        processor = AutoProcessor.from_pretrained(model_name)
        model = (
            AutoModelForImageTextToText.from_pretrained(model_name, **{dtype_kwarg(): dtype})
            .to(device)
            .eval()
        )
    # missing path, hub id not cached, unknown class, no torchvision
    except (OSError, ValueError, ImportError) as e:
        raise JudgeError(f"cannot load the judge {model_name}: {one_line(e)}") from None

    def complete(messages) -> str:
        chat, images = hf_inputs(messages)
        text = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        inputs = processor(text=[text], images=images, return_tensors="pt").to(device)
        # some processors return it; older generate() refuses what the model ignores
        inputs.pop("token_type_ids", None)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
        return processor.batch_decode(
            out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        )[0]

    return complete


# ---------------------------------------------------------- the scorer `eval_geneval.py score` uses


class VLMScorer:
    """scorer(image, meta) -> (1 | 0 | -1, reason); eval_geneval.summarize leaves -1 rows out."""

    def __init__(self, spec: str | None = None, device: str | None = None):
        self.spec = spec or DEFAULT_JUDGE
        backend, model = parse_judge_spec(self.spec)
        self.complete = openai_backend(model) if backend == "openai" else hf_backend(model, device)
        # greedy decoding: a retry repeats the answer
        self.attempts = ATTEMPTS if backend == "openai" else 1

    def __call__(self, image: Image.Image, meta: dict) -> tuple[int, str]:
        return judge(self.complete, build_messages(meta, image), self.attempts)

    def note(self, unevaluated: int, images: int) -> str:
        """The summary's note on the images the judge left unevaluated."""
        share = 100 * unevaluated / max(images, 1)
        return (
            f"judge {self.spec}: {unevaluated} of {images} images ({share:.1f}%) "
            f"not evaluated after {self.attempts} attempt(s), left out of every accuracy above"
        )
