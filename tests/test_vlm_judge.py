"""Tests for tools/vlm_judge.py (GenEval++ with a VLM judge): the official checklist wording, answer
parsing, retries, the openai: path against a local OpenAI-compatible server, and the hf: path on a
tiny random Llava built in-process. No network, nothing downloaded."""

import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from PIL import Image

import eval_geneval as E
from standins import eval_error, write_lines
from tools import vlm_judge as V

# One line of each of GenEval++'s 7 tags, as in its metadata file (plurals and "on the above"
# included).
GENEVAL_PP = [
    {
        "tag": "color_attr",
        "include": [
            {"class": "bus", "count": 1, "color": "brown"},
            {"class": "truck", "count": 1, "color": "green"},
            {"class": "skateboard", "count": 1, "color": "red"},
        ],
        "prompt": "A photo of a brown bus, a green truck, and a red skateboard",
    },
    {
        "tag": "spatial_count_attr",
        "include": [
            {"class": "clock", "count": 3, "region": "left"},
            {"class": "cat", "count": 1, "region": "right"},
        ],
        "prompt": "A photo of three clocks on the left and one cats on the right",
    },
    {
        "tag": "color_spatial_attr",
        "include": [
            {"class": "spoon", "count": 1, "color": "blue", "region": "left"},
            {"class": "couch", "count": 1, "color": "red", "region": "right"},
        ],
        "prompt": "A photo of blue spoon on the left and red couch on the right",
    },
    {
        "tag": "color_count_attr",
        "include": [
            {"class": "boat", "count": 3, "color": "white"},
            {"class": "hot dog", "count": 1, "color": "green"},
        ],
        "prompt": "A photo of three white boats and one green hot dogs",
    },
    {
        "tag": "multi_object_count_attr",
        "include": [
            {"class": "tennis racket", "count": 2},
            {"class": "broccoli", "count": 2},
            {"class": "sports ball", "count": 3},
        ],
        "prompt": "A photo of two tennis rackets, two broccolis, and three sports balls",
    },
    {
        "tag": "size_spatial_attr",
        "include": [
            {"class": "bench", "count": 1, "size": "larger", "region": "above"},
            {"class": "spoon", "count": 1, "size": "smaller", "region": "below"},
        ],
        "prompt": "A photo of a larger bench on the above and a smaller spoon on the below",
    },
    {
        "tag": "counting",
        "include": [{"class": "clock", "count": 6}],
        "exclude": [{"class": "clock", "count": 7}],
        "prompt": "A photo of six clocks",
    },
]

# Hand-written from the official script's metadata_to_explanation (matrix0721/GvU,
# evaluation/evaluation_geneval_plus.py).
EXPECTED_CHECKLISTS = {
    "color_attr": "This image should contain:\n"
    "- brown-colored 1 bus present in the image.\n"
    "- green-colored 1 truck present in the image.\n"
    "- red-colored 1 skateboard present in the image.",
    "spatial_count_attr": "This image should contain:\n"
    "- 3 clocks located in the left part of the image.\n"
    "- 1 cat located in the right part of the image.",
    "color_spatial_attr": "This image should contain:\n"
    "- blue-colored 1 spoon located in the left part of the image.\n"
    "- red-colored 1 couch located in the right part of the image.",
    "color_count_attr": "This image should contain:\n"
    "- white-colored 3 boats present in the image.\n"
    "- green-colored 1 hot dog present in the image.",
    "multi_object_count_attr": "This image should contain:\n"
    "- 2 tennis rackets present in the image.\n"
    "- 2 broccolis present in the image.\n"
    "- 3 sports balls present in the image.",
    "size_spatial_attr": "This image should contain:\n"
    "- larger 1 bench located in the above part of the image.\n"
    "- smaller 1 spoon located in the below part of the image.",
    "counting": "This image should contain:\n"
    "- 6 clocks present in the image.\n"
    "- No more than 6 clocks should appear.",
}


def image_folder(tmp_path, metas, per_prompt=2):
    """GenEval layout with solid-colour 40x30 images (colour k per image) for the given metadata."""
    colors = ["red", "blue", "green", "white"]
    for i, m in enumerate(metas):
        E.write_prompt_folder(
            tmp_path / "run",
            i,
            m,
            [
                Image.new("RGB", (40, 30), colors[(i * per_prompt + j) % 4])
                for j in range(per_prompt)
            ],
        )
    return tmp_path / "run"


# ---------------------------------------------------------------------- checklist and prompt (pure)


def test_checklist_matches_the_official_wording_for_each_geneval_pp_tag(tmp_path):
    """Every line of a GenEval++-format metadata file (one per tag) gives the hand-written official
    checklist."""
    assert {m["tag"] for m in GENEVAL_PP} == set(E.GENEVAL_PP_TAGS) | {"color_attr", "counting"}
    # valid GenEval++ metadata
    metas = E.read_metadata(write_lines(tmp_path / "pp.jsonl", GENEVAL_PP))
    for m in metas:
        assert V.checklist(m) == EXPECTED_CHECKLISTS[m["tag"]], m["tag"]
    assert V.user_text(metas[-1]) == (
        "Instruction:\nA photo of six clocks\n\nExpectation checklist:\n"
        + EXPECTED_CHECKLISTS["counting"]
    )
    # colour before size, as the official order
    both = {"class": "dog", "count": 2, "color": "red", "size": "larger"}
    assert V.describe_include(both) == "red-colored larger 2 dogs present in the image"


def test_messages_are_system_prompt_then_text_then_jpeg():
    """The request is the fixed system prompt, then the checklist text and a base64 JPEG of the
    image."""
    image = Image.new("RGB", (40, 30), "red")
    system, user = V.build_messages(GENEVAL_PP[0], image)
    assert system == {"role": "system", "content": V.SYSTEM_PROMPT}
    assert (
        V.SYSTEM_PROMPT.startswith("You are an expert image evaluator.")
        and '"correct": 1 if' in V.SYSTEM_PROMPT
    )
    text, picture = user["content"]
    assert text == {"type": "text", "text": V.user_text(GENEVAL_PP[0])}
    header, data = picture["image_url"]["url"].split(",", 1)
    assert header == "data:image/jpeg;base64"
    decoded = Image.open(io.BytesIO(base64.b64decode(data)))
    assert decoded.format == "JPEG" and decoded.size == (40, 30)


# --------------------------------------------------------------------------- answers and retries


@pytest.mark.parametrize(
    "answer, verdict",
    [
        (
            '```json\n{"correct": 1, "reason": "all objects present"}\n```',
            (1, "all objects present"),
        ),
        ('{"correct": 0, "reason": "two dogs, not three"}', (0, "two dogs, not three")),
        (
            'Here is my verdict:\n{"correct": 1, "reason": "fine"}\nLet me know if you need more.',
            (1, "fine"),
        ),
        (
            '```\n{\n  "correct": 0,\n  "reason": "the cat is on the left"\n}\n```',
            (0, "the cat is on the left"),
        ),
        ('{"correct": true, "reason": "yes"}', (1, "yes")),
    ],
)
def test_verdict_is_read_from_fenced_unfenced_and_chatty_answers(answer, verdict):
    """The JSON object is found with or without a ```json fence and amid chat."""
    assert V.parse_verdict(answer) == verdict


@pytest.mark.parametrize(
    "answer",
    [
        "The image looks right to me.",  # no JSON at all
        '{"correct": 1, "reason": "unterminated}',  # broken JSON
        # two objects: greedy match is not JSON (as official)
        '{"correct": 1} and then {"correct": 0}',
        '{"reason": "forgot the verdict"}',  # no "correct"
        '{"correct": "yes", "reason": "string verdict"}',  # not 0/1
        '{"correct": 2, "reason": "out of range"}',
    ],
)
def test_malformed_answers_raise_value_error(answer):
    """Answers without a usable {"correct": 0|1} object are errors (so they are retried)."""
    with pytest.raises(ValueError):
        V.parse_verdict(answer)


def test_judge_retries_with_backoff_and_gives_up_with_minus_one():
    """Unusable answers are retried up to 6 calls in all, waiting backoff * 2**k; then
    correct = -1."""
    answers, sleeps = iter(["no json", '{"correct": 0, "reason": "no cat"}']), []
    assert V.judge(lambda m: next(answers), [], backoff=1.0, sleep=sleeps.append) == (0, "no cat")
    assert sleeps == [1.0]
    calls, sleeps = [], []

    def failing(messages):
        calls.append(messages)
        raise V.TransientError("HTTP 503")

    correct, reason = V.judge(failing, [], backoff=0.5, sleep=sleeps.append)
    assert correct == -1 and len(calls) == 6 and sleeps == [0.5, 1.0, 2.0, 4.0, 8.0]
    assert reason == "not evaluated after 6 attempt(s); last: call failed: HTTP 503"


# ----------------------------------------------------------------------- openai: path, local server


class FakeOpenAI(BaseHTTPRequestHandler):
    """POST /v1/chat/completions: record the request, answer with the next scripted (status,
    content)."""

    script, requests = [], []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(
            {"path": self.path, "auth": self.headers.get("Authorization"), "body": body}
        )
        status, content = (
            type(self).script.pop(0) if type(self).script else (500, "script exhausted")
        )
        if status == 200:
            reply = {
                "id": "x",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop",
                        "message": {"role": "assistant", "content": content},
                    }
                ],
            }
        else:
            reply = {"error": {"message": content, "type": "server_error", "code": None}}
        data = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):  # keep pytest output quiet
        pass


@pytest.fixture
def fake_openai(monkeypatch):
    """A chat-completions server on 127.0.0.1 in a thread; the openai client is pointed at it by env
    vars."""
    pytest.importorskip(
        "openai",
        reason="the openai: judge path needs the optional openai package (pip install openai)",
    )
    FakeOpenAI.script, FakeOpenAI.requests = [], []
    server = HTTPServer(("127.0.0.1", 0), FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{server.server_port}/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    monkeypatch.setattr(V, "RETRY_BACKOFF_S", 0.0)
    yield FakeOpenAI
    server.shutdown()
    server.server_close()


def test_openai_judge_end_to_end_sends_the_protocol_and_keeps_unevaluated_out(
    tmp_path, fake_openai, capsys
):
    """score --scorer vlm --judge openai:M: protocol in every request; retries; -1 rows reported,
    not scored."""
    metas = [GENEVAL_PP[-1], GENEVAL_PP[0]]  # counting, color_attr; 2 images each
    run = image_folder(tmp_path, metas)
    fake_openai.script = [
        (200, '```json\n{"correct": 1, "reason": "six clocks"}\n```'),  # image 1: first try
        (200, "I am not sure."),
        (500, "overloaded"),  # image 2: two failures,
        (200, 'Verdict: {"correct": 0, "reason": "seven clocks"} Thanks!'),  #   then an answer
        *[(200, '{"correct": "maybe"}')] * 3,
        *[(200, "no json")] * 3,  # image 3: 6 failures -> -1
        (200, '{"correct": 1, "reason": "bus, truck, skateboard"}'),  # image 4
    ]
    assert (
        E.main(
            [
                "score",
                str(run),
                "--scorer",
                "vlm",
                "--judge",
                "openai:judge-model",
                "--out",
                str(tmp_path / "s"),
            ]
        )
        == 0
    )
    requests = fake_openai.requests
    assert len(requests) == 11 and not fake_openai.script
    per_request_meta = [metas[0]] * 4 + [metas[1]] * 7
    for req, m in zip(requests, per_request_meta):
        body = req["body"]
        assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer test-key"
        assert (
            body["model"] == "judge-model"
            and body["temperature"] == 0
            and body["max_tokens"] == 200
        )
        assert body["messages"][0] == {"role": "system", "content": V.SYSTEM_PROMPT}
        text, picture = body["messages"][1]["content"]
        assert text["text"] == V.user_text(m) and V.checklist(m) in text["text"]
        header, data = picture["image_url"]["url"].split(",", 1)
        decoded = Image.open(io.BytesIO(base64.b64decode(data)))
        assert (
            header == "data:image/jpeg;base64"
            and decoded.format == "JPEG"
            and decoded.size == (40, 30)
        )
    first = Image.open(
        io.BytesIO(
            base64.b64decode(
                requests[0]["body"]["messages"][1]["content"][1]["image_url"]["url"].split(",")[1]
            )
        )
    )
    # image 1 is red
    assert max(abs(a - b) for a, b in zip(first.convert("RGB").getpixel((20, 15)), (255, 0, 0))) < 8
    rows = [
        json.loads(line) for line in (tmp_path / "s" / "results.jsonl").read_text().splitlines()
    ]
    assert [r["correct"] for r in rows] == [True, False, -1, True]
    assert [r["reason"] for r in rows[:2]] == ["six clocks", "seven clocks"]
    assert (
        rows[2]["reason"]
        == "not evaluated after 6 attempt(s); last: unusable answer (no JSON object in the "
        "answer): 'no json'"
    )
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["tags"]["counting"] == {"images": 2, "accuracy": 0.5, "unevaluated": 0}
    assert summary["tags"]["color_attr"] == {"images": 1, "accuracy": 1.0, "unevaluated": 1}
    assert (
        summary["overall"] == 0.75
        and summary["unevaluated"] == 1
        and summary["unevaluated_share"] == 0.25
    )
    assert summary["scorer"] == "vlm" and summary["judge"] == "openai:judge-model"
    md = (tmp_path / "s" / "summary.md").read_text()
    assert (
        "| color_attr | 1 | 1.0000 |" in md
        and "1 of 4 images (25.0%) not evaluated after 6 attempt(s)" in md
    )
    assert "judge attempt 6/6 failed" in capsys.readouterr().err


def test_openai_judge_stops_on_rejected_credentials_and_missing_key(
    tmp_path, fake_openai, monkeypatch
):
    """A 401 from the endpoint, or no OPENAI_API_KEY, is a one-line error, not 6 retries per
    image."""
    run = image_folder(tmp_path, [GENEVAL_PP[-1]], per_prompt=1)
    fake_openai.script = [(401, "Incorrect API key provided")]
    msg = eval_error(["score", str(run), "--scorer", "vlm", "--judge", "openai:judge-model"])
    assert "Incorrect API key provided" in msg and len(fake_openai.requests) == 1
    monkeypatch.delenv("OPENAI_API_KEY")
    assert "cannot create the OpenAI client" in eval_error(["score", str(run), "--scorer", "vlm"])


def test_bad_judge_and_missing_openai_package_are_one_line_errors(tmp_path, monkeypatch):
    """--judge must be openai:MODEL or hf:MODEL; without the openai package the error names pip
    install openai."""
    run = image_folder(tmp_path, [GENEVAL_PP[-1]], per_prompt=1)
    assert "bad --judge 'gpt-4.1'" in eval_error(
        ["score", str(run), "--scorer", "vlm", "--judge", "gpt-4.1"]
    )
    assert "bad --judge 'hf:'" in eval_error(
        ["score", str(run), "--scorer", "vlm", "--judge", "hf:"]
    )
    # `import openai` now raises ImportError
    monkeypatch.setitem(__import__("sys").modules, "openai", None)
    assert "pip install openai" in eval_error(
        ["score", str(run), "--scorer", "vlm", "--judge", "openai:m"]
    )
    assert "cannot load the judge" in eval_error(
        ["score", str(run), "--scorer", "vlm", "--judge", f"hf:{tmp_path / 'no-such-model'}"]
    )


# ---------------------------------------------------------------------- hf: path, tiny random Llava


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    """A tiny random Llava (CLIP vision tower + Qwen2 text model) with a word-level tokenizer, saved
    to a folder. (Qwen2-VL's processor cannot be built without torchvision in transformers 5, so
    Llava stands in.)"""
    import torch
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    try:
        from transformers.models.clip.image_processing_pil_clip import (
            CLIPImageProcessorPil as ImageProcessor,
        )
    except ImportError:  # transformers 4.x
        from transformers import CLIPImageProcessor as ImageProcessor
    folder = tmp_path_factory.mktemp("tiny-llava")
    # no braces
    words = [
        "<unk>",
        "the",
        "image",
        "shows",
        "a",
        "clock",
        "yes",
        "no",
        "system",
        "user",
        "assistant",
    ]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(
        [
            AddedToken(t, normalized=False)
            for t in ["<pad>", "<|im_start|>", "<|im_end|>", "<image>"]
        ]
    )
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
        "<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>"
    )
    processor = LlavaProcessor(
        image_processor=ImageProcessor(
            size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}
        ),
        tokenizer=tokenizer,
        chat_template=template,
        patch_size=14,
        image_token="<image>",
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    config = LlavaConfig(
        text_config=dict(
            model_type="qwen2",
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=512,
        ),
        vision_config=dict(
            model_type="clip_vision_model",
            image_size=28,
            patch_size=14,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.suppress_tokens = tokenizer.convert_tokens_to_ids(
        ["<pad>", "<|im_start|>", "<image>"]
    )
    model.generation_config.min_new_tokens = 4  # so the random model says a few (visible) words
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


def test_hf_judge_sees_the_messages_and_unparseable_answers_become_minus_one(tmp_path, tiny_vlm):
    """hf:MODEL renders system prompt + checklist + image through the chat template; random
    text -> -1."""
    from transformers import AutoProcessor

    messages = V.build_messages(GENEVAL_PP[-1], Image.new("RGB", (40, 30), "red"))
    chat, images = V.hf_inputs(messages)
    assert (
        chat[1]["content"][1] == {"type": "image"}
        and len(images) == 1
        and images[0].size == (40, 30)
    )
    rendered = AutoProcessor.from_pretrained(tiny_vlm).apply_chat_template(
        chat, add_generation_prompt=True, tokenize=False
    )
    assert V.SYSTEM_PROMPT in rendered and V.user_text(GENEVAL_PP[-1]) + "<image>" in rendered
    run = image_folder(tmp_path, [GENEVAL_PP[-1]], per_prompt=2)
    assert (
        E.main(
            ["score", str(run), "--scorer", "vlm", "--judge", f"hf:{tiny_vlm}", "--device", "cpu"]
        )
        == 0
    )
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in rows] == [-1, -1]
    prefix = (
        "not evaluated after 1 attempt(s); last: unusable answer (no JSON object in the answer): '"
    )
    # it said something
    assert all(r["reason"].startswith(prefix) and len(r["reason"]) > len(prefix) + 1 for r in rows)
    summary = json.loads((run / "summary.json").read_text())
    assert (
        summary["unevaluated"] == 2
        and summary["unevaluated_share"] == 1.0
        and summary["tags"] == {}
    )
