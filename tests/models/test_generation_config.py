"""generate's sampling defaults: the model's generation_config.json, else llama.cpp's; a flag
given on the command line wins."""
from __future__ import annotations

import json
import shutil

import pytest

from distserve.cli import build_parser, main, sampling_from_args
from distserve.models.generation_config import FALLBACK, sampling_defaults


def _folder(tmp_path, generation_config=None):
    (tmp_path / "config.json").write_text("{}")
    if generation_config is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(generation_config))
    return tmp_path


def test_the_models_generation_config_gives_the_defaults(tmp_path):
    folder = _folder(tmp_path, {"bos_token_id": 1, "temperature": 0.6, "top_p": 0.9})
    got, source = sampling_defaults(str(folder))
    assert got == {"temperature": 0.6, "top_p": 0.9, "top_k": -1}   # an omitted key: off, as in vLLM
    assert source == str(folder / "generation_config.json")


@pytest.mark.parametrize("generation_config", [None, {"bos_token_id": 1, "eos_token_id": 2}])
def test_a_model_without_sampling_in_its_config_gets_llama_cpps_defaults(tmp_path, generation_config):
    got, source = sampling_defaults(str(_folder(tmp_path, generation_config)))
    assert got == FALLBACK == {"temperature": 0.8, "top_p": 0.95, "top_k": 40}
    assert source.startswith("llama.cpp's defaults")


def test_the_builtin_gguf_samples():
    got, _ = sampling_defaults(None)
    assert got == FALLBACK


def test_a_bad_value_is_refused_by_name(tmp_path):
    folder = _folder(tmp_path, {"temperature": "hot"})
    with pytest.raises(ValueError, match="temperature must be a number, got 'hot'"):
        sampling_defaults(str(folder))


def test_a_flag_on_the_command_line_wins(tmp_path):
    folder = _folder(tmp_path, {"temperature": 0.6, "top_p": 0.9, "top_k": 20})
    args = build_parser().parse_args(["generate", "--model", str(folder), "--temperature", "0",
                                      "--top-k", "5", "hi"])
    params, _ = sampling_from_args(args)
    assert (params.temperature, params.top_p, params.top_k) == (0.0, 0.9, 5)
    args = build_parser().parse_args(["generate", "--model", str(folder), "hi"])
    params, _ = sampling_from_args(args)
    assert (params.temperature, params.top_p, params.top_k) == (0.6, 0.9, 20)


def test_generate_samples_as_the_model_says(tmp_path, tiny_llama, capsys):
    """A model whose generation_config.json says temperature 0 decodes greedily through
    `distserve generate`: the same text as --temperature 0 given."""
    folder = tmp_path / "tiny"
    shutil.copytree(tiny_llama, folder)
    (folder / "generation_config.json").write_text(json.dumps({"temperature": 0.0}))
    common = ["generate", "--model", str(folder), "--dtype", "float32", "--num-kv-blocks", "8",
              "--max-tokens", "8", "The weather today"]
    assert main(common) == 0
    by_config = capsys.readouterr()
    assert main([*common, "--temperature", "0"]) == 0
    by_flag = capsys.readouterr()
    assert "sampling: temperature 0, top_p 1, top_k -1" in by_config.err
    assert str(folder / "generation_config.json") in by_config.err
    assert by_config.out == by_flag.out and by_config.out.strip()
