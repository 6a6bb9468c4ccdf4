"""Teachers (LLaMA, GPT-2): logit parity with Hugging Face PyTorch models, export round trip,
KV-cache decoding, causality, conversion errors. Tiny sizes so the whole file runs in seconds."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from discreteflow_jax.io import hf as convert
from discreteflow_jax.models.generate import generate, sample_logits
from discreteflow_jax.models.gpt2 import GPT2, GPT2Config
from discreteflow_jax.models.llama import Llama, LlamaConfig

VOCAB, DIM, LAYERS, HEADS, MAX_LEN = 101, 32, 2, 4, 64
EOS = 100
TOL = 1e-4


def _torch():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    torch.set_num_threads(1)  # two threads on a loaded 2-core machine can be far slower
    return torch


def _randomize(torch, model, seed: int) -> None:
    # HF's init (std 0.02, unit norms) gives near-zero logits that would hide conversion bugs.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm_scale = p.ndim == 1 and name.endswith("weight")
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if is_norm_scale else 0.3) + float(is_norm_scale))


def _hf_gpt2(torch, path):
    from transformers import GPT2Config as HFConfig
    from transformers import GPT2LMHeadModel

    hf = HFConfig(
        vocab_size=VOCAB, n_embd=DIM, n_layer=LAYERS, n_head=HEADS, n_positions=MAX_LEN, bos_token_id=EOS,
        eos_token_id=EOS,
    )
    model = GPT2LMHeadModel(hf).eval()
    _randomize(torch, model, 0)
    model.save_pretrained(path)
    return model


def _hf_llama(torch, path, *, kv_heads: int, tied: bool):
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    hf = HFConfig(
        vocab_size=VOCAB, hidden_size=DIM, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=kv_heads, max_position_embeddings=MAX_LEN, tie_word_embeddings=tied,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0}, bos_token_id=1, eos_token_id=EOS,
    )
    model = LlamaForCausalLM(hf).eval()
    _randomize(torch, model, 1)
    # Sharded on purpose: exercises the index-json path of the loader.
    model.save_pretrained(path, max_shard_size="20KB")
    return model


@pytest.fixture(scope="module", params=["gpt2", "llama-mha-untied", "llama-gqa-tied"])
def teacher(request, tmp_path_factory):
    """(our model, its config, the HF torch model, checkpoint dir) for each architecture."""
    torch = _torch()
    path = str(tmp_path_factory.mktemp(request.param))
    if request.param == "gpt2":
        hf = _hf_gpt2(torch, path)
    else:
        gqa = request.param == "llama-gqa-tied"
        hf = _hf_llama(torch, path, kv_heads=2 if gqa else HEADS, tied=gqa)
    model, config = convert.load_hf_checkpoint(path)
    return model, config, hf, path


def _jit_forward(model):
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(tokens, mask, positions):
        return nnx.merge(graphdef, state)(tokens, key_mask_BT=mask, positions_BT=positions)

    return forward


def _hf_logits(torch, hf, tokens, mask=None, positions=None):
    kw = {}
    if mask is not None:
        kw["attention_mask"] = torch.tensor(np.asarray(mask, np.int64))
    if positions is not None:
        kw["position_ids"] = torch.tensor(np.asarray(positions, np.int64))
    with torch.no_grad():
        return hf(torch.tensor(np.asarray(tokens, np.int64)), **kw).logits.numpy()


def test_config_read_from_hf(teacher):
    _, config, hf, path = teacher
    if isinstance(config, LlamaConfig):
        assert config.rope_theta == 500.0 and config.norm_eps == hf.config.rms_norm_eps
        assert config.kv_heads == hf.config.num_key_value_heads
        assert config.tie_embeddings == hf.config.tie_word_embeddings
        assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 1
    assert config.eos_id == EOS and config.max_len == MAX_LEN


@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_logits_match_hf(teacher, padding):
    torch = _torch()
    model, _, hf, _ = teacher
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, VOCAB, (3, 12))
    lengths = np.array([12, 7, 3])
    mask = positions = None
    if padding == "right":
        mask = np.arange(12)[None] < lengths[:, None]
    elif padding == "left":
        mask = np.arange(12)[None] >= (12 - lengths)[:, None]
        positions = np.maximum(np.cumsum(mask, -1) - 1, 0)  # what HF generate uses with left padding
    ours = np.asarray(
        _jit_forward(model)(
            jnp.asarray(tokens), None if mask is None else jnp.asarray(mask),
            None if positions is None else jnp.asarray(positions),
        )
    )
    ref = _hf_logits(torch, hf, tokens, mask, positions)
    assert ours.dtype == np.float32
    assert np.abs(ref).max() > 1.0  # the comparison is not vacuous
    valid = np.ones(tokens.shape, bool) if mask is None else mask  # pad queries' outputs are unused
    np.testing.assert_allclose(ours[valid], ref[valid], atol=TOL, rtol=0)


def test_export_llama_round_trip(tmp_path):
    torch = _torch()
    from transformers import LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, dim=DIM, num_layers=LAYERS, num_heads=HEADS, num_kv_heads=2, ffn_hidden=48,
        max_len=MAX_LEN, rope_theta=1234.0, norm_eps=1e-5, tie_embeddings=False, init_std=0.3, bos_id=1, eos_id=EOS,
    )
    model = Llama(config, rngs=nnx.Rngs(3))
    tokenizer = tmp_path / "tokenizer.model"
    tokenizer.write_bytes(b"not a real sentencepiece model")
    out = str(tmp_path / "export")
    convert.export_llama_to_hf(model, config, out, tokenizer_path=str(tokenizer))
    assert os.path.exists(os.path.join(out, "tokenizer.model"))
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["rope_parameters"]["rope_theta"] == 1234.0

    hf = LlamaForCausalLM.from_pretrained(out).eval()
    assert hf.config.rope_parameters["rope_theta"] == 1234.0 and hf.config.eos_token_id == EOS
    tokens = np.random.default_rng(1).integers(0, VOCAB, (2, 10))
    ours = np.asarray(_jit_forward(model)(jnp.asarray(tokens), None, None))
    np.testing.assert_allclose(ours, _hf_logits(torch, hf, tokens), atol=TOL, rtol=0)

    reloaded, reloaded_config = convert.load_hf_checkpoint(out)
    assert reloaded_config == config
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(reloaded))):
        np.testing.assert_array_equal(np.asarray(a.value), np.asarray(b.value), err_msg=str(path))


def _uncached_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Reference: full forward over the whole sequence for every new token (no cache)."""
    forward = _jit_forward(model)
    width = len(prompt) + n  # one fixed shape, so one compile; later slots are causally invisible
    seq = list(prompt)
    for _ in range(n):
        tokens = jnp.asarray([seq + [0] * (width - len(seq))])
        seq.append(int(jnp.argmax(forward(tokens, None, None)[0, len(seq) - 1])))
    return seq[len(prompt):]


def test_cached_greedy_matches_uncached(teacher):
    model, _, _, _ = teacher
    prompts = [[5, 17, 3, 99, 42], [7, 8], [60]]
    n = 6
    width = max(map(len, prompts))
    right = np.zeros((3, width), np.int32)
    left = np.zeros((3, width), np.int32)
    for i, p in enumerate(prompts):
        right[i, : len(p)] = p
        left[i, width - len(p):] = p
    lengths = np.array([len(p) for p in prompts])
    expected = np.array([_uncached_greedy(model, p, n) for p in prompts])

    out = generate(model, right, prompt_lengths_B=lengths, max_new_tokens=n, rng=jax.random.key(0), greedy=True)
    np.testing.assert_array_equal(np.asarray(out.tokens), expected)
    np.testing.assert_array_equal(np.asarray(out.lengths), [n] * 3)
    left_mask = np.arange(width)[None] >= (width - lengths)[:, None]
    out = generate(model, left, left_mask, max_new_tokens=n, rng=jax.random.key(0), greedy=True)
    np.testing.assert_array_equal(np.asarray(out.tokens), expected)

    # Stop at EOS: pretend row 0's third greedy token is EOS.
    eos = int(expected[0, 2])
    out = generate(model, right, prompt_lengths_B=lengths, max_new_tokens=n, rng=jax.random.key(0), greedy=True,
                   eos_id=eos, pad_id=0)
    tokens = np.asarray(out.tokens)
    for row in range(3):
        hits = np.flatnonzero(expected[row] == eos)
        stop = hits[0] + 1 if hits.size else n
        assert out.lengths[row] == stop
        np.testing.assert_array_equal(tokens[row, :stop], expected[row, :stop])
        assert (tokens[row, stop:] == 0).all()


def _tiny(kind: str):
    if kind == "gpt2":
        return GPT2(GPT2Config(vocab_size=VOCAB, dim=DIM, num_layers=LAYERS, num_heads=HEADS, max_len=MAX_LEN,
                               init_std=0.3), rngs=nnx.Rngs(0))
    return Llama(LlamaConfig(vocab_size=VOCAB, dim=DIM, num_layers=LAYERS, num_heads=HEADS, num_kv_heads=2,
                             ffn_hidden=48, max_len=MAX_LEN, init_std=0.3), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_causality(kind):
    forward = _jit_forward(_tiny(kind))
    tokens = np.random.default_rng(2).integers(0, VOCAB, (2, 10))
    j = 6
    perturbed = tokens.copy()
    perturbed[:, j] = (perturbed[:, j] + 1) % VOCAB
    a = np.asarray(forward(jnp.asarray(tokens), None, None))
    b = np.asarray(forward(jnp.asarray(perturbed), None, None))
    np.testing.assert_array_equal(a[:, :j], b[:, :j])
    assert np.abs(a[:, j:] - b[:, j:]).max(axis=-1).min() > 1e-4


def test_sampling_filters():
    logits = jnp.log(jnp.array([[0.05, 0.7, 0.25], [0.5, 0.1, 0.4]]))
    keys = jax.random.split(jax.random.key(0), 64)
    top1 = jax.vmap(lambda k: sample_logits(logits, k, 1.0, top_k=1))(keys)
    assert (top1 == jnp.array([1, 0])).all()
    assert (sample_logits(logits, keys[0], 1.0, greedy=True) == jnp.array([1, 0])).all()
    # Nucleus 0.8: row 0 keeps {1, 2}; row 1 keeps {0, 2}.
    samples = np.asarray(jax.vmap(lambda k: sample_logits(logits, k, 1.0, top_p=0.8))(keys))
    assert set(samples[:, 0]) == {1, 2} and set(samples[:, 1]) == {0, 2}


def _gpt2_state_dict(path):
    return {k: np.array(v) for k, v in convert.SafetensorsCheckpoint(*convert.safetensors_files(path)).items()}


def test_conversion_errors_name_keys(tmp_path):
    torch = _torch()
    _hf_gpt2(torch, str(tmp_path))
    config = GPT2Config(vocab_size=VOCAB, dim=DIM, num_layers=LAYERS, num_heads=HEADS, max_len=MAX_LEN)
    base = _gpt2_state_dict(str(tmp_path))

    # Layouts seen in the wild load: no "transformer." prefix, causal-mask buffers, a stored tied head.
    bare = {k.removeprefix("transformer."): v for k, v in base.items()}
    bare["h.0.attn.bias"] = np.tril(np.ones((1, 1, MAX_LEN, MAX_LEN), np.float32))
    bare["lm_head.weight"] = bare["wte.weight"]
    convert.params_from_hf(bare, config)

    broken = dict(base)
    del broken["transformer.h.1.mlp.c_fc.weight"]
    broken["transformer.h.0.attn.q_attn.weight"] = np.zeros((DIM, DIM), np.float32)
    broken["transformer.h.0.attn.c_attn.weight"] = np.zeros((DIM, 2 * DIM), np.float32)
    with pytest.raises(convert.ConversionError) as err:
        convert.params_from_hf(broken, config)
    message = str(err.value)
    assert "missing keys" in message and "h.1.mlp.c_fc.weight" in message
    assert "unexpected keys" in message and "h.0.attn.q_attn.weight" in message
    assert "h.0.attn.c_attn.weight" in message and "(32, 64)" in message and "(32, 96)" in message
    assert "layers.0.attn.q_proj.kernel" in message

    with pytest.raises(convert.ConversionError, match="model_type"):
        convert.config_from_hf({"model_type": "bert"})
