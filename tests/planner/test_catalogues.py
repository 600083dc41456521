"""Model and hardware catalogues, KV capacity and the parallelism constraints."""
import json

import pytest

from distserve.planner.hardware import HARDWARE, Cluster, get_hardware
from distserve.planner.memory import check_parallelism, kv_capacity_tokens
from distserve.planner.models import get_model

REQUIRED = ["opt-13b", "opt-66b", "opt-175b", "Llama-2-7b-hf", "Llama-2-13b", "Llama-2-70b",
            "Llama-3.1-8B", "Llama-3.1-70B", "Mistral-7B-v0.1", "Qwen2.5-7B", "Qwen2.5-32B",
            "Qwen2.5-72B", "SmolLM2-135M", "Qwen3-0.6B", "Qwen3-8B", "Qwen3-32B", "Llama-3.2-1B",
            "Llama-3.2-3B", "Llama-3.3-70B-Instruct", "Llama-3.1-405B"]


@pytest.mark.parametrize("name", REQUIRED)
def test_catalogue_has_the_issue_models(name):
    m = get_model(name)
    assert m.layers > 0 and m.hidden % m.heads == 0 and m.heads % m.kv_heads == 0


@pytest.mark.parametrize("name,billions", [("facebook/opt-13b", 12.85), ("facebook/opt-66b", 65.7),
                                           ("facebook/opt-175b", 174.6), ("meta-llama/Llama-2-7b-hf", 6.74),
                                           ("meta-llama/Llama-3.1-8B", 8.03), ("Qwen/Qwen2.5-72B", 72.7),
                                           ("HuggingFaceTB/SmolLM2-135M", 0.135),
                                           ("Qwen/Qwen3-0.6B", 0.596), ("Qwen/Qwen3-8B", 8.19),
                                           ("Qwen/Qwen3-14B", 14.8), ("Qwen/Qwen3-32B", 32.8),
                                           ("meta-llama/Llama-3.2-1B", 1.24),
                                           ("meta-llama/Llama-3.2-3B", 3.21),
                                           ("meta-llama/Llama-3.1-405B", 405.9)])
def test_parameter_counts_match_the_published_sizes(name, billions):
    assert get_model(name).params / 1e9 == pytest.approx(billions, rel=0.01)


def test_kv_bytes_per_token_by_hand():
    # reference: 2 x layers x hidden x bytes; OPT-66B is 2.25 MiB per token in fp16
    assert get_model("opt-66b").kv_bytes_per_token == 2 * 64 * 9216 * 2 == int(2.25 * 2**20)
    # GQA: Llama-3.1-8B keeps 8 of 32 heads of 128 dims
    assert get_model("llama-3.1-8b").kv_bytes_per_token == 2 * 32 * 8 * 128 * 2


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match="known models: .*facebook/opt-13b"):
        get_model("gpt-5")
    with pytest.raises(ValueError, match="known hardware: a100-80g, h100-80g, h200, l40s"):
        get_hardware("tpu-v9")


def test_config_json(tmp_path):
    cfg = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
           "num_hidden_layers": 3, "intermediate_size": 128, "vocab_size": 100,
           "max_position_embeddings": 512, "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    m = get_model(str(tmp_path))
    assert (m.layers, m.kv_heads, m.head_dim, m.max_positions) == (3, 2, 16, 512)
    # q, k, v, o, three MLP matrices, two norms per layer; embeddings tied; final norm
    per_layer = 64 * (64 + 2 * 32) + 64 * 64 + 3 * 64 * 128 + 2 * 64
    assert m.params == 3 * per_layer + 100 * 64 + 64


def test_hardware_table():
    a100 = HARDWARE["a100-80g"]
    assert a100.flops == 312e12 and a100.mem_bandwidth == 2039e9 and a100.memory == 80 * 2**30
    assert get_hardware("H100").name == "h100-80g"
    c = Cluster(a100, nodes=4, gpus_per_node=8)
    assert c.num_gpus == 32 and c.link(True) == 300e9 and c.link(False) == 25e9 / 8


def test_kv_capacity_uses_the_artifact_table_and_agrees_with_the_arithmetic():
    a100 = get_hardware("a100-80g")
    assert kv_capacity_tokens(get_model("opt-13b"), a100, 1, 1) == 66144
    assert kv_capacity_tokens(get_model("opt-66b"), a100, 4, 2) == 212320
    other = Cluster(a100).hardware.__class__("x", a100.flops, a100.mem_bandwidth, a100.memory, 1)
    for name, tp, pp, table in [("opt-13b", 4, 1, 356736), ("opt-66b", 4, 2, 212320), ("opt-175b", 3, 3, 76192)]:
        assert kv_capacity_tokens(get_model(name), other, tp, pp) == pytest.approx(table, rel=0.03)
    assert kv_capacity_tokens(get_model("opt-66b"), other, 1, 1) == 0


def test_parallelism_constraints():
    a100 = get_hardware("a100-80g")
    assert check_parallelism(get_model("opt-13b"), a100, 2, 1, 2048) is None
    assert "heads" in check_parallelism(get_model("opt-13b"), a100, 3, 1, 2048)
    assert "layers" in check_parallelism(get_model("opt-13b"), a100, 1, 3, 2048)
    assert "KV tokens" in check_parallelism(get_model("opt-66b"), a100, 1, 1, 2048)
    assert get_model("llama-2-70b").valid_tp(8) and not get_model("qwen2.5-7b").valid_tp(8)


def test_a_qwen3_config_json_is_read_with_its_head_dim(tmp_path):
    """Qwen3-32B's config.json: head_dim 128 where hidden / heads is 80, q and k norms, and a
    sliding window it does not use; the KV per token and the parameters are the real ones."""
    cfg = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 5120,
           "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128,
           "num_hidden_layers": 64, "intermediate_size": 25600, "vocab_size": 151936,
           "max_position_embeddings": 40960, "tie_word_embeddings": False,
           "attention_bias": False, "sliding_window": None, "use_sliding_window": False}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    m = get_model(str(tmp_path))
    assert m.head_dim == 128 and m.kv_bytes_per_token == 256 * 1024      # not 160 KiB
    assert m.params / 1e9 == pytest.approx(32.8, rel=0.01)               # not 30.5 B
    assert m.shape == get_model("Qwen/Qwen3-32B").shape and m.sliding_window is None
    cfg.update(model_type="mistral", sliding_window=4096, use_sliding_window=True, head_dim=None)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert get_model(str(tmp_path)).sliding_window == 4096
