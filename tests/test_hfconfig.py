"""Config files read as transformers reads them (memplan/catalog/hfconfig.py), torch-free: attribute_map aliases,
class defaults, legacy model_type names, auto_map on native model types, remote-only model types, multimodal
wrappers, and values the config class rejects. Fixtures in tests/data/hub_configs are real hub config.json shapes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from memplan.catalog import resolve_model
from memplan.catalog.hfconfig import read_config, table
from memplan.errors import MemplanError

HUB = Path(__file__).parent / "data" / "hub_configs"


def _hub(name: str) -> dict:
    return json.loads((HUB / name).read_text())


def test_phi3_with_auto_map_is_read_natively_and_says_so():
    spec = resolve_model(str(HUB / "phi-3-mini-4k-instruct.json"))
    assert spec.model_type == "phi3" and "auto_map" not in spec.hf_config
    assert spec.total_params == 3_821_079_552  # microsoft/Phi-3-mini-4k-instruct safetensors metadata
    (note,) = [n for n in spec.notes if "auto_map" in n]
    assert "natively" in note and "trust_remote_code=False" in note


@pytest.mark.parametrize("fixture, catalog", [("falcon-7b-refinedwebmodel.json", "falcon-7b"),
                                              ("falcon-40b-refinedweb.json", "falcon-40b")])
def test_old_falcon_configs_read_as_the_native_falcon(fixture, catalog):
    """RefinedWeb / RefinedWebModel with n_layer / n_head (/ n_head_kv): transformers' conversion script's mapping."""
    spec = resolve_model(str(HUB / fixture))
    ref = resolve_model(catalog)
    assert spec.model_type == "falcon"
    assert spec.total_params == ref.total_params
    assert (spec.num_layers, spec.num_heads, spec.num_kv_heads) == (ref.num_layers, ref.num_heads, ref.num_kv_heads)
    assert any("read as transformers' native 'falcon'" in n for n in spec.notes)


def test_old_falcon_builds_the_same_model_in_transformers():
    """The renamed config is one transformers builds: same parameter count on meta as memplan's."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg, _ = read_config(_hub("falcon-40b-refinedweb.json"), "falcon-40b")
    cfg = dict(cfg, num_hidden_layers=2)
    config = transformers.AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    from memplan.architectures import from_hf_config

    assert sum(p.numel() for p in model.parameters()) == from_hf_config(cfg, "x", "x").total_params


def test_n_layer_in_a_native_falcon_config_is_named():
    """transformers' FalconConfig has no attribute_map: it would silently use its default 32 layers."""
    cfg = dict(_hub("falcon-7b-refinedwebmodel.json"), model_type="falcon")
    cfg.pop("auto_map")
    with pytest.raises(MemplanError, match="'n_head' is not read by .*FalconConfig.*name it 'num_attention_heads'"):
        read_config(cfg, "cfg")


def test_gpt2_style_aliases_become_the_standard_names():
    cfg, _ = read_config({"model_type": "gpt2", "n_embd": 64, "n_layer": 3, "n_head": 4, "vocab_size": 100}, "gpt2")
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]) == (64, 3, 4)
    assert cfg["max_position_embeddings"] == cfg["n_positions"] == 1024  # GPT2Config default, via its alias
    # the standard name wins over the class's own field, as transformers' __setattr__ routes it
    cfg, _ = read_config({"model_type": "gpt2", "n_embd": 64, "hidden_size": 128}, "gpt2")
    assert cfg["n_embd"] == cfg["hidden_size"] == 128


def test_defaults_fill_absent_fields_like_transformers():
    transformers = pytest.importorskip("transformers")
    for model_type in ("falcon", "qwen2", "mistral", "gemma2", "phi3", "olmo2", "cohere", "starcoder2"):
        cfg, _ = read_config({"model_type": model_type}, model_type)
        ref = transformers.AutoConfig.for_model(model_type)
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "tie_word_embeddings"):
            if hasattr(ref, key) and key in cfg:
                assert cfg[key] == getattr(ref, key), (model_type, key)


@pytest.mark.parametrize("field, value, kind", [("hidden_size", "4096", "int"), ("num_hidden_layers", True, "int"),
                                                ("tie_word_embeddings", 1, "bool"), ("rms_norm_eps", 1, "float")])
def test_a_value_transformers_rejects_is_one_line_naming_the_field(field, value, kind):
    with pytest.raises(MemplanError) as err:
        read_config({"model_type": "llama", field: value}, "cfg.json")
    assert f"config field {field!r} must be {kind}" in str(err.value) and "\n" not in str(err.value)
    transformers = pytest.importorskip("transformers")
    with pytest.raises(Exception, match=field):  # transformers rejects it too
        transformers.LlamaConfig.from_dict({field: value})


def test_remote_only_model_type_needs_the_flag(tmp_path):
    cfg = {"model_type": "internlm2", "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config"},
           "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(MemplanError, match="only by remote code .*pass --trust-remote-code"):
        resolve_model(str(path))
    assert read_config(cfg, "x", trust_remote_code=True)[0]["model_type"] == "internlm2"
    # with the flag, memplan still runs no remote code: one line saying it cannot model this type
    with pytest.raises(MemplanError, match="exists only as the model's remote code, which memplan never runs"):
        resolve_model(str(path), trust_remote_code=True)


def test_a_native_model_type_without_a_causal_lm_is_named():
    with pytest.raises(MemplanError, match="no causal-LM class for model_type 't5'"):
        read_config({"model_type": "t5"}, "cfg")


def test_a_multimodal_wrapper_is_read_through_its_text_config():
    cfg, notes = read_config(_hub("gemma-3-4b-it.json"), "gemma-3-4b-it")
    assert cfg["model_type"] == "gemma3_text" and cfg["hidden_size"] == 2560
    assert cfg["num_attention_heads"] == 8 and cfg["head_dim"] == 256  # Gemma3TextConfig defaults
    assert any("multimodal" in n and "vision" in n for n in notes)


def test_the_table_names_its_transformers_version():
    data = table()
    assert data["transformers"].count(".") == 2 and data["generated_by"] == "scripts/gen_hf_configs.py"
    assert {"llama", "falcon", "gemma3_text", "olmo2", "deepseek_v2"} <= set(data["causal_lm"])
