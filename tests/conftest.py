"""The fixtures the test files share: the thread setting, a hang watchdog, and the models built
from standins.py (the tiny UMM, the shipped checkpoint, the Janus-Pro and X-Omni stand-ins).
`stand_in` is each of the three UMMs in turn, with its own slow reward loop as the reference:
test_umm_contract.py runs the interface's contract tests once, on all three."""

import faulthandler
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from models.tiny_umm import TinyUMM
from standins import (
    PROMPTS,
    SHIPPED,
    build_janus,
    geometric_means,
    images_for,
    janus_token_logprobs,
    load_xomni,
    needs_janus,
    tiny_token_logprobs,
    write_xomni,
    xomni_token_logprobs,
)


@pytest.fixture(autouse=True)
def watchdog():
    """A test still running after 10 minutes (the slowest, a 2-process torchrun test, takes about a
    minute) has hung: every thread's stack is printed and the suite exits with an error, instead of
    holding CI until its time limit."""
    faulthandler.dump_traceback_later(600, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread is far faster than two on a shared 2-core machine (spin-waiting),
    and runs are bit-for-bit reproducible across processes."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def umm():
    """A tiny random UMM (2 layers of 64)."""
    return TinyUMM.random(seed=0, hidden=64, layers=2)


@pytest.fixture(scope="module")
def shipped():
    """The shipped tiny UMM (checkpoints/tiny-umm), for tests that leave it as it is."""
    return TinyUMM.from_pretrained(SHIPPED)


@pytest.fixture(scope="module")
def janus():
    """(adapters.JanusPro on a tiny random Janus, its JanusProcessor)."""
    return build_janus(0)


@pytest.fixture(scope="session")
def xomni_dirs(tmp_path_factory):
    """(model folder, FLUX folder) of the X-Omni stand-in."""
    return write_xomni(tmp_path_factory.mktemp("xomni"))


@pytest.fixture(scope="session")
def xomni_ref(xomni_dirs):
    """The stand-in as X-Omni's generate.py / chat.py use it: from_pretrained + init_vision, nothing
    dropped; and its tokenizer."""
    xdir, fdir = xomni_dirs
    model = AutoModelForCausalLM.from_pretrained(xdir, trust_remote_code=True).eval()
    model.init_vision(fdir)
    return model, AutoTokenizer.from_pretrained(xdir, use_fast=True, trust_remote_code=True)


@pytest.fixture(scope="module")
def xomni(xomni_dirs):
    """adapters.XOmni on the stand-in."""
    return load_xomni(xomni_dirs)


@pytest.fixture(scope="module", params=["tiny", pytest.param("janus", marks=needs_janus), "xomni"])
def stand_in(request, one_thread):
    """One of the three UMMs, with: build(seed) -> a fresh one (LoRA injects in place),
    reference(umm, images, prompts) -> (rewards fp64, token counts) by the model's own per-token
    loop, images to judge, and where LoRA must land (lora_scope: a regex every wrapped module's name
    matches; n_lora: how many modules)."""
    name = request.param
    with torch.no_grad():
        if name == "tiny":
            build = lambda seed: TinyUMM.random(seed=seed, hidden=64, layers=2)
            reference = lambda umm, images, prompts: geometric_means(
                tiny_token_logprobs(umm, images, prompts)
            )
            lora_scope, n_lora = r"^model\.layers\.\d+\.", 2 * 7
        elif name == "janus":
            processor = build_janus(0)[1]
            build = lambda seed: build_janus(seed)[0]
            reference = lambda umm, images, prompts: geometric_means(
                janus_token_logprobs(umm, processor, images, prompts)
            )
            lora_scope, n_lora = r"\.language_model\.layers\.\d+\.", 2 * 7
        else:
            dirs = request.getfixturevalue("xomni_dirs")
            model, tok = request.getfixturevalue("xomni_ref")
            build = lambda seed: load_xomni(dirs)  # the stand-in's weights live in its folder
            reference = lambda umm, images, prompts: geometric_means(
                xomni_token_logprobs(model, tok, images, prompts)
            )
            lora_scope, n_lora = r"^model\.layers\.\d+\.", 4 * 7
        umm = build(0)
        images = images_for(umm, len(PROMPTS))
    return SimpleNamespace(
        name=name,
        umm=umm,
        build=build,
        reference=reference,
        images=images,
        lora_scope=lora_scope,
        n_lora=n_lora,
    )
