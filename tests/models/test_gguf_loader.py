"""Tests for distserve/models/gguf_loader.py: tiny GGUF files written here, and the real SmolLM2.

Tiny files are written with gguf.GGUFWriter, their Q/K rows permuted by llama.cpp's own formula,
so the un-permutation is checked against the converter and not against our code. The real file
is compared with transformers' GGUF conversion; that takes 15 s or more (AutoConfig re-reads the
file, then load_gguf_checkpoint dequantises it again), so it is loaded once per module.
"""
from __future__ import annotations

import math
import pathlib

import gguf
import numpy as np
import pytest
import torch

from distserve.models.gguf_loader import load_gguf, load_gguf_tokenizer, read_gguf_config
from distserve.models.locate import find_default_gguf

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN = 32, 2, 1, 16, 64
TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "a", "b", "ab", "Ġ", "Ġa", "1", "2"]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """LlamaModel.permute from llama.cpp's convert_hf_to_gguf.py, copied as is."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def write_tiny_gguf(path: pathlib.Path, arch: str, *, tied: bool = True, biases: bool = False,
                    pre: str = "smollm", rope_freqs: np.ndarray | None = None,
                    add_bos: bool = False) -> dict:
    """A one-layer model with random weights; returns them under Hugging Face names."""
    rng = np.random.default_rng(0)
    hf = {
        "model.embed_tokens.weight": rng.standard_normal((len(TOKENS), HIDDEN)),
        "model.norm.weight": rng.standard_normal(HIDDEN),
        "model.layers.0.input_layernorm.weight": rng.standard_normal(HIDDEN),
        "model.layers.0.post_attention_layernorm.weight": rng.standard_normal(HIDDEN),
        "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((HEADS * HEAD_DIM, HIDDEN)),
        "model.layers.0.self_attn.k_proj.weight": rng.standard_normal((KV_HEADS * HEAD_DIM, HIDDEN)),
        "model.layers.0.self_attn.v_proj.weight": rng.standard_normal((KV_HEADS * HEAD_DIM, HIDDEN)),
        "model.layers.0.self_attn.o_proj.weight": rng.standard_normal((HIDDEN, HEADS * HEAD_DIM)),
        "model.layers.0.mlp.gate_proj.weight": rng.standard_normal((FFN, HIDDEN)),
        "model.layers.0.mlp.up_proj.weight": rng.standard_normal((FFN, HIDDEN)),
        "model.layers.0.mlp.down_proj.weight": rng.standard_normal((HIDDEN, FFN)),
    }
    if not tied:
        hf["lm_head.weight"] = rng.standard_normal((len(TOKENS), HIDDEN))
    if biases:
        for proj, rows in (("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS)):
            hf[f"model.layers.0.self_attn.{proj}_proj.bias"] = rng.standard_normal(rows * HEAD_DIM)
    hf = {name: value.astype(np.float32) for name, value in hf.items()}

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(500000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(TOKENS)
    writer.add_token_types([3, 3, 3] + [1] * (len(TOKENS) - 3))
    writer.add_token_merges(["a b", "Ġ a"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template(CHAT_TEMPLATE)

    to_gguf = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
               "model.layers.0.input_layernorm": "blk.0.attn_norm",
               "model.layers.0.post_attention_layernorm": "blk.0.ffn_norm",
               "model.layers.0.self_attn.q_proj": "blk.0.attn_q",
               "model.layers.0.self_attn.k_proj": "blk.0.attn_k",
               "model.layers.0.self_attn.v_proj": "blk.0.attn_v",
               "model.layers.0.self_attn.o_proj": "blk.0.attn_output",
               "model.layers.0.mlp.gate_proj": "blk.0.ffn_gate",
               "model.layers.0.mlp.up_proj": "blk.0.ffn_up",
               "model.layers.0.mlp.down_proj": "blk.0.ffn_down"}
    for name, value in hf.items():
        module, kind = name.rsplit(".", 1)
        if arch == "llama" and module.endswith("q_proj"):
            value = llama_cpp_permute(value, HEADS, HEADS)
        elif arch == "llama" and module.endswith("k_proj"):
            value = llama_cpp_permute(value, HEADS, KV_HEADS)
        if module == "model.embed_tokens":  # one quantised tensor, as real files have
            q8_0 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor("token_embd.weight", gguf.quants.quantize(value, q8_0), raw_dtype=q8_0)
        else:
            writer.add_tensor(f"{to_gguf[module]}.{kind}", value)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf


def assert_same_weights(loaded: dict[str, torch.Tensor], written: dict[str, np.ndarray]) -> None:
    assert set(loaded) == set(written)
    for name, value in written.items():
        assert loaded[name].dtype == torch.float32, name
        if name == "model.embed_tokens.weight":  # Q8_0: 8 bits per value and a scale per 32
            tolerance = float(np.abs(value).max()) / 127
            assert np.abs(loaded[name].numpy() - value).max() <= tolerance, name
        else:
            assert np.array_equal(loaded[name].numpy(), value), name


def test_tiny_llama_undoes_llama_cpp_q_k_permutation(tmp_path):
    path = tmp_path / "tiny-llama.gguf"
    written = write_tiny_gguf(path, "llama")

    model = load_gguf(path)

    assert_same_weights(model.tensors, written)
    assert model.config["model_type"] == "llama"
    assert model.config["num_key_value_heads"] == KV_HEADS
    assert model.config["head_dim"] == HEAD_DIM
    assert model.config["rms_norm_eps"] == 1e-6
    assert model.config["rope_scaling"] is None
    assert model.config["tie_word_embeddings"] is True
    assert model.config["attention_bias"] is False


def test_tiny_qwen2_keeps_rows_and_biases_and_untied_head(tmp_path):
    path = tmp_path / "tiny-qwen2.gguf"
    written = write_tiny_gguf(path, "qwen2", tied=False, biases=True, pre="qwen2")

    model = load_gguf(path)

    assert_same_weights(model.tensors, written)
    assert model.config["model_type"] == "qwen2"
    assert model.config["architectures"] == ["Qwen2ForCausalLM"]
    assert model.config["tie_word_embeddings"] is False
    assert model.tokenizer.tokenize("ab a") == ["ab", "Ġa"]


def test_llama3_rope_factors_and_bos(tmp_path):
    # convert_hf_to_gguf.py's Llama 3.1 factors, for factor 32 (Llama 3.2's)
    low_wavelen, high_wavelen = 8192 / 1.0, 8192 / 4.0
    factors = []
    for freq in 1.0 / 500000.0 ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM):
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(32.0)
        else:
            smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
            factors.append(1 / ((1 - smooth) / 32.0 + smooth))
    path = tmp_path / "tiny-llama3.gguf"
    write_tiny_gguf(path, "llama", rope_freqs=np.array(factors), add_bos=True)

    model = load_gguf(path)

    assert model.config["rope_scaling"] == {
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}
    assert not any("rope_freqs" in name for name in model.tensors)
    assert model.tokenizer("ab")["input_ids"] == [1, 5]  # Llama 3 files ask for a BOS


def test_tiny_tokenizer_from_metadata(tmp_path):
    path = tmp_path / "tiny-llama.gguf"
    write_tiny_gguf(path, "llama")

    tokenizer = load_gguf_tokenizer(path)

    assert tokenizer.tokenize("ab a12") == ["ab", "Ġa", "1", "2"]
    assert tokenizer.decode(tokenizer("ab a12")["input_ids"]) == "ab a12"
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.bos_token == "<|im_start|>"
    assert tokenizer("<|im_start|>ab")["input_ids"] == [1, 5]
    assert tokenizer.apply_chat_template([{"role": "user", "content": "ab"}], tokenize=False) == \
        "<|im_start|>ab<|im_end|>"


def test_sentencepiece_vocabulary_goes_through_transformers(tmp_path):
    path = tmp_path / "tiny-spm.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(HIDDEN)
    writer.add_head_count(HEADS)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "<s>", "</s>", "▁", "a", "b", "▁a", "▁b", "ab", "▁ab"])
    writer.add_token_scores([0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -0.5])
    writer.add_token_types([2, 3, 3, 1, 1, 1, 1, 1, 1, 1])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_tensor("token_embd.weight", np.zeros((10, HIDDEN), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    tokenizer = load_gguf_tokenizer(path)

    assert tokenizer("ab a")["input_ids"] == [1, 9, 6]  # <s> ▁ab ▁a
    assert tokenizer.decode([1, 9, 6], skip_special_tokens=True) == "ab a"


def test_unsupported_architecture_is_named(tmp_path):
    path = tmp_path / "tiny-gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    with pytest.raises(ValueError, match=r"'gpt2' model; this loader reads only llama, qwen2"):
        load_gguf(path)
    with pytest.raises(ValueError, match=r"'gpt2'"):
        read_gguf_config(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.gguf"):
        load_gguf(tmp_path / "nowhere.gguf")


# The built-in default model (slow: reading it takes 4 to 7 s, transformers' copy 15 s) ------

@pytest.fixture(scope="module")
def smollm2():
    return load_gguf(find_default_gguf())


@pytest.mark.slow
def test_smollm2_config(smollm2):
    assert find_default_gguf().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert smollm2.config == {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
        "rms_norm_eps": 1e-05, "rope_theta": 100000.0, "rope_scaling": None,
        "max_position_embeddings": 8192, "vocab_size": 49152, "tie_word_embeddings": True,
        "torch_dtype": "float32", "attention_bias": False, "mlp_bias": False,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


@pytest.mark.slow
def test_smollm2_tensor_names_and_shapes(smollm2):
    tensors = smollm2.tensors
    assert len(tensors) == 2 + 30 * 9  # embedding, final norm, nine per layer; lm_head is tied
    assert "lm_head.weight" not in tensors
    assert tensors["model.embed_tokens.weight"].shape == (49152, 576)
    assert tensors["model.layers.29.self_attn.q_proj.weight"].shape == (576, 576)
    assert tensors["model.layers.29.self_attn.k_proj.weight"].shape == (192, 576)
    assert tensors["model.layers.0.mlp.down_proj.weight"].shape == (576, 1536)
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in tensors.values())


@pytest.mark.slow
def test_smollm2_tokenizer(smollm2):
    tokenizer = smollm2.tokenizer
    text = "Hello, world! Ça va?  tabs\tand\nnewlines, 日本語 😀, in 2024"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert ids[-4:] == tokenizer.convert_tokens_to_ids(["2", "0", "2", "4"])
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert (tokenizer.bos_token, tokenizer.pad_token) == ("<|im_start|>", "<|im_end|>")
    assert tokenizer("Hi")["input_ids"] == tokenizer.convert_tokens_to_ids(["Hi"])  # no BOS added
    # the original tokenizer.json splits every numeral alone (Digits), "½" included
    assert tokenizer.tokenize(" ½ 12") == ["Ġ", "Â½", "Ġ", "1", "2"]

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}], tokenize=False, add_generation_prompt=True)
    assert prompt == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                      "Hugging Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                      "<|im_start|>assistant\n")
    prompt_ids = tokenizer(prompt)["input_ids"]
    assert prompt_ids.count(1) == 3 and prompt_ids.count(2) == 2  # turn markers stay whole
    assert tokenizer.decode(prompt_ids, skip_special_tokens=True).startswith("system\nYou are")


@pytest.fixture(scope="module")
def transformers_reference():
    """transformers' own conversion of the same file: config and tensors.

    Through load_gguf_checkpoint, which is what from_pretrained(gguf_file=...) runs to get the
    weights of a llama GGUF; from_pretrained itself also wants the accelerate package.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = find_default_gguf()
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    with torch.device("meta"):  # only its parameter names are used
        model = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    return config, model, tensors


@pytest.mark.slow
def test_smollm2_tensors_equal_transformers(smollm2, transformers_reference):
    _, model, reference = transformers_reference
    assert set(smollm2.tensors) == set(reference) == {n for n, _ in model.named_parameters()}
    for name, tensor in reference.items():
        assert torch.equal(smollm2.tensors[name], tensor.float()), name


@pytest.mark.slow
def test_smollm2_config_agrees_with_transformers(smollm2, transformers_reference):
    reference = transformers_reference[0].to_dict()
    ours = smollm2.config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "vocab_size",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
                "hidden_act", "model_type"):
        assert ours[key] == reference[key], key
    assert math.isclose(ours["rms_norm_eps"], reference["rms_norm_eps"], rel_tol=1e-6)
    rope_theta = reference.get("rope_theta") or reference["rope_parameters"]["rope_theta"]
    assert ours["rope_theta"] == rope_theta


@pytest.mark.slow
def test_smollm2_tokenizer_agrees_with_transformers_on_ascii(smollm2):
    from transformers import AutoTokenizer

    path = find_default_gguf()
    reference = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    texts = ["Hello, world!  Two spaces\tand a tab\n", "def f(x):\n    return x**2  # 12345",
             "don't won't I'm y'all", "3.14159 1,000,000 v1.2.3",
             "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"]
    for text in texts:
        assert smollm2.tokenizer(text)["input_ids"] == reference(text)["input_ids"], text
