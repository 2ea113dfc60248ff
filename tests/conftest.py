"""Shared fixtures: a tiny Qwen2 and a tokenizer trained in-process, so no test touches the network."""

import os
import socket
import subprocess
import sys

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n N`: N workers share the cores, one thread each (and
    os.environ["OMP_NUM_THREADS"] = "1"  # for the scripts they start), so they do not fight over them
    torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DATA = os.path.join(ROOT, "tests", "data", "math_tiny.jsonl")
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "What is 2 + 3? The answer is \\boxed{5}.",
    "Compute 7 * 6 = 42, so \\boxed{42}.",
    "Let x = 4. Then x^2 = 16 and the final answer is \\boxed{16}.",
    "Solve for y: 3y = 12, y = 4.",
    "You are a helpful assistant. Think step by step, then answer in a box.",
    "0123456789 +-*/=()[]{}",
]


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
    tok.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(
            vocab_size=300, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=CHATML,
    )


def make_model(tokenizer, seed=0, head_scale=1.0, **overrides):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **({"tie_word_embeddings": False} | overrides),
    )
    lm = Qwen2ForCausalLM(config)
    with torch.no_grad():  # a random tiny model is near-uniform; a larger head makes it opinionated
        lm.lm_head.weight.mul_(head_scale)  # (tied: the embedding with it)
    return lm.eval()


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer):
    """A saved tiny model directory, loadable by intuitor.py --model."""
    path = str(tmp_path_factory.mktemp("tiny"))
    make_model(tokenizer, head_scale=8.0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tied_dir(tmp_path_factory, tokenizer):
    """The same, with the lm_head tied to the input embedding (as Qwen2.5 up to 3B and SmolLM2 are)."""
    path = str(tmp_path_factory.mktemp("tied"))
    make_model(tokenizer, head_scale=8.0, tie_word_embeddings=True).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def torchrun(nproc, *argv, check=True):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false"
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
        *argv,
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert p.returncode == 0, p.stderr[-4000:]
    return p


# ----------------------------------------------------------------------------- helpers for tests of the method
import ablations  # noqa: E402,F401  (every test sees the literature's registry entries, as `python intuitor.py` does)
import intuitor as I  # noqa: E402


def loss_terms(logp, old_logp, ref_logp, advantages, beta, epsilon, epsilon_high, kl_estimator="k3"):
    """The token ratio, the KL and per_token_loss as optimize computes them: (loss, kl, clipped), all (B, C)."""
    args = I.Args(epsilon=epsilon, epsilon_high=epsilon_high)
    ratio, low, high = I.IMPORTANCE_RATIOS["token"](logp, old_logp, None, args)
    kl = I.KL_ESTIMATORS[kl_estimator](logp, ref_logp) if beta else torch.zeros_like(logp)
    loss, clipped = I.per_token_loss(ratio, advantages, kl, beta, low, high)
    return loss, kl, clipped


def mixed_advantages(rewards, weights, num_generations, mixing="separate", scale="group"):
    """Step 3 as the loop runs it (REWARD_MIXINGS), as a (B,) tensor when every advantage is one float."""
    args = I.Args(reward_mixing=mixing, scale_rewards=scale)
    advantages = I.REWARD_MIXINGS[mixing](rewards, weights, num_generations, args)
    return advantages if any(torch.is_tensor(a) for a in advantages) else torch.tensor(advantages)
