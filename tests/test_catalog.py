"""The catalog: every model's parameter counts are exact (validation ladder, step 1), and the loader finds models
by name, alias, local config.json, folder or hub-cache id, with errors that say what is wrong.

"Exact" means: memplan's ModelSpec, built from the catalog entry's config fields with no torch, counts the same
parameters as the model transformers builds from the same config (on the meta device: no memory, no download),
and the same total as the publisher states, where the catalog has a stated count.
"""
from __future__ import annotations

import json
from functools import lru_cache

import pytest

from memplan.catalog import HERE, gpu_list, models, resolve_gpu, resolve_model
from memplan.errors import MemplanError

CATALOG = json.loads((HERE / "models.json").read_text())["models"]
GPUS = json.loads((HERE / "gpus.json").read_text())["gpus"]
NAMES = [m["name"] for m in CATALOG]
STATED = [m["name"] for m in CATALOG if m.get("stated_params") is not None]


# ------------------------------------------------------------------------------------- transformers on meta


def _fix_token_ids(cfg) -> None:
    """A config with a tiny vocab can carry pad/bos/eos ids outside it; transformers then fails to build the
    embedding (padding_idx out of range). Those ids change no parameter, so drop the invalid ones."""
    vocab = getattr(cfg, "vocab_size", None)
    if not vocab:
        return
    for attr in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and not 0 <= value < vocab:
            setattr(cfg, attr, None)
        elif isinstance(value, list):
            setattr(cfg, attr, [v for v in value if 0 <= v < vocab] or None)


def build_meta(config: dict):
    """The model transformers builds for this config.json, on the meta device."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    cfg = transformers.AutoConfig.for_model(**config)
    _fix_token_ids(cfg)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(cfg)


def transformers_counts(model) -> dict:
    torch = pytest.importorskip("torch")
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    embedding = sum(p.numel() for mod in model.modules() if isinstance(mod, torch.nn.Embedding)
                    for p in mod.parameters(recurse=False))  # token (+ learned position) embeddings
    # What transformers' replace_with_bnb_linear converts: modules whose type *is* nn.Linear, but lm_head.
    linear = sum(mod.weight.numel() for name, mod in model.named_modules()
                 if type(mod) is torch.nn.Linear and name.split(".")[-1] != "lm_head")
    return {"total": total, "embedding": embedding, "quantizable_linear_weights": linear}


@lru_cache(maxsize=None)
def catalog_counts(name: str) -> tuple:
    entry = models()[name]
    counts = transformers_counts(build_meta(entry["config"]))
    return counts["total"], counts["embedding"], counts["quantizable_linear_weights"]


@pytest.mark.parametrize("name", NAMES)
def test_param_counts_match_transformers(name):
    spec = resolve_model(name)
    counts = spec.param_counts()
    total, embedding, linear = catalog_counts(name)
    assert spec.total_params == total, f"{name}: memplan {spec.total_params:,} vs transformers {total:,}"
    assert counts["total"] == total
    assert counts["embedding"] == embedding
    assert counts["quantizable_linear_weights"] == linear
    # The parts add up to the whole.
    assert counts["embedding"] + counts["lm_head"] + counts["layers"] + counts["other"] \
        + sum(lin.weight_numel for lin in spec.other_linears) == total
    assert sum(counts["per_layer"]) == counts["layers"]
    assert counts["num_layers"] == entry_config(name)["num_hidden_layers"]


@pytest.mark.parametrize("name", STATED)
def test_total_equals_the_stated_count(name):
    """Validation ladder, step 1: the count the publisher states, exactly."""
    spec = resolve_model(name)
    assert spec.stated_params == models()[name]["stated_params"]
    assert spec.total_params == spec.stated_params, \
        f"{name}: memplan {spec.total_params:,} vs stated {spec.stated_params:,}"


@pytest.mark.parametrize("name", ["qwen1.5-moe-a2.7b", "falcon-7b", "opt-6.7b", "qwen3-30b-a3b", "llama-3.2-1b",
                                  "gemma-2-2b", "phi-3-mini-4k", "pythia-6.9b"])
def test_quantizable_linears_are_what_bitsandbytes_converts(name):
    """Cross-check the `type(m) is nn.Linear` rule against transformers' own replace_with_bnb_linear."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear
    from transformers.quantizers.base import get_keys_to_not_convert

    model = build_meta(models()[name]["config"])
    model = replace_with_bnb_linear(model, modules_to_not_convert=get_keys_to_not_convert(model),
                                    quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    converted = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    assert converted == resolve_model(name).param_counts()["quantizable_linear_weights"]


def entry_config(name: str) -> dict:
    return models()[name]["config"]


# ------------------------------------------------------------------------------------------ catalog data


def test_catalog_entries_are_well_formed():
    assert len(CATALOG) >= 50
    assert len(set(NAMES)) == len(NAMES)
    for entry in CATALOG:
        assert entry["name"] == entry["name"].strip().lower(), entry["name"]
        assert entry["source"].startswith("https://huggingface.co/") and entry["source"].endswith("config.json")
        assert entry["hf_id"] in entry["source"]
        stated = entry["stated_params"]
        assert stated is None or (isinstance(stated, int) and stated > 0)
        assert isinstance(entry["aliases"], list)
        assert entry["config"]["model_type"]


def test_no_alias_points_at_two_models():
    seen: dict[str, str] = {}
    for entry in CATALOG:
        for alias in {entry["name"], entry["hf_id"], *entry["aliases"]}:
            key = alias.strip().lower()
            assert seen.setdefault(key, entry["name"]) == entry["name"], \
                f"{alias!r} names both {seen[key]} and {entry['name']}"


def test_the_catalog_covers_every_supported_model_type():
    from memplan.architectures import BUILDERS

    # every hand-written builder has a catalog model; the others are derived (memplan/derive)
    assert {e["config"]["model_type"] for e in CATALOG} >= set(BUILDERS)


# ------------------------------------------------------------------------------------------------ lookup


def test_lookup_by_alias_hub_id_and_any_case():
    assert resolve_model("llama-3-8b").name == "llama-3-8b"
    assert resolve_model("LLAMA3-8B").name == "llama-3-8b"
    assert resolve_model("  Llama-3-8B ").name == "llama-3-8b"
    assert resolve_model("meta-llama/Meta-Llama-3-8B").name == "llama-3-8b"
    assert resolve_model("meta-llama/meta-llama-3-8b-instruct").name == "llama-3-8b"
    assert resolve_model("mistral-7b").name == "mistral-7b-v0.1"
    assert resolve_model("Qwen/Qwen2.5-7B-Instruct").name == "qwen2.5-7b"
    spec = resolve_model("qwen2.5-7b")
    assert spec.source == models()["qwen2.5-7b"]["source"]
    assert spec.stated_params == 7615616512


TINY_LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 3,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100, "max_position_embeddings": 128,
              "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": [128001, 128009]}


def _tiny_llama_total() -> int:
    return transformers_counts(build_meta(TINY_LLAMA))["total"]


def test_a_local_config_json_and_a_folder_holding_one(tmp_path):
    folder = tmp_path / "my-tiny-llama"
    folder.mkdir()
    path = folder / "config.json"
    path.write_text(json.dumps(TINY_LLAMA))

    by_file = resolve_model(str(path))
    by_folder = resolve_model(str(folder))
    assert by_file.name == by_folder.name == "my-tiny-llama"
    assert by_file.source == by_folder.source == str(path)
    assert by_file.total_params == by_folder.total_params
    assert by_file.stated_params is None
    assert by_file.total_params == _tiny_llama_total()  # token ids outside the tiny vocab were fixed up

    other = tmp_path / "variant.json"  # any file name works; the spec is named after it
    other.write_text(json.dumps(TINY_LLAMA))
    assert resolve_model(str(other)).name == "variant"


def test_a_folder_without_config_json(tmp_path):
    with pytest.raises(MemplanError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_a_multimodal_wrapper_uses_its_text_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llava", "text_config": TINY_LLAMA, "vision_config": {}}))
    assert resolve_model(str(path)).total_params == _tiny_llama_total()


def _fake_hub_cache(root, repo_id: str, config: dict, revision: str = "0123456789abcdef") -> None:
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision + "\n")
    (repo / "snapshots" / revision).mkdir(parents=True)
    (repo / "snapshots" / revision / "config.json").write_text(json.dumps(config))


def test_a_hub_id_in_the_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    _fake_hub_cache(tmp_path, "some-org/tiny-llama", TINY_LLAMA)
    spec = resolve_model("some-org/tiny-llama")
    assert spec.name == "some-org/tiny-llama"
    assert spec.source.startswith(str(tmp_path)) and spec.source.endswith("config.json")
    assert spec.total_params == _tiny_llama_total()


def test_a_hub_id_in_the_cache_without_refs_main(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    _fake_hub_cache(tmp_path, "some-org/tiny-llama", TINY_LLAMA)
    (tmp_path / "models--some-org--tiny-llama" / "refs" / "main").unlink()
    assert resolve_model("some-org/tiny-llama").total_params == _tiny_llama_total()


def test_a_hub_id_not_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(MemplanError, match="not in the local Hugging Face cache"):
        resolve_model("some-org/not-downloaded")


def test_an_unknown_model_suggests_close_names():
    with pytest.raises(MemplanError) as err:
        resolve_model("llama-3-8")
    message = str(err.value)
    assert "unknown model 'llama-3-8'" in message
    assert "did you mean" in message and "llama-3-8b" in message
    assert "\n" not in message

    with pytest.raises(MemplanError, match="did you mean: .*qwen2.5-7b"):
        resolve_model("qwen2.5-7")


def test_a_malformed_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"model_type": "llama", "hidden_size": 64,')
    with pytest.raises(MemplanError, match="malformed JSON at line 1"):
        resolve_model(str(path))


@pytest.mark.parametrize("field", ["hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                                   "intermediate_size"])
def test_a_config_missing_a_field_takes_the_transformers_default(tmp_path, field):
    """As transformers reads it: an absent field is the config class's default (LlamaConfig's here)."""
    config = dict(TINY_LLAMA, num_attention_heads=32, num_key_value_heads=32, hidden_size=256)
    del config[field]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    spec = resolve_model(str(path))
    transformers = pytest.importorskip("transformers")
    assert spec.hf_config[field] == getattr(transformers.LlamaConfig(), field)


def test_a_config_missing_the_model_type_names_it(tmp_path):
    config = dict(TINY_LLAMA)
    del config["model_type"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(MemplanError, match="missing the field 'model_type'"):
        resolve_model(str(path))


@pytest.mark.parametrize("model_type, field", [("falcon", "num_attention_heads"), ("opt", "ffn_dim"),
                                               ("mixtral", "num_local_experts"), ("qwen2_moe", "num_experts"),
                                               ("qwen3_moe", "moe_intermediate_size")])
def test_each_architecture_names_its_own_missing_field(model_type, field):
    config = dict(next(e["config"] for e in CATALOG if e["config"]["model_type"] == model_type))
    del config[field]
    from memplan.architectures import from_hf_config

    with pytest.raises(MemplanError, match=f"missing the field '{field}'"):
        from_hf_config(config, "test", "test")


def test_a_bad_field_value_is_named(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(TINY_LLAMA, hidden_size="64")))
    with pytest.raises(MemplanError, match="'hidden_size' must be int, got '64' .*LlamaConfig rejects it"):
        resolve_model(str(path))


def test_an_unsupported_model_type_is_named(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(TINY_LLAMA, model_type="not_a_model")))
    with pytest.raises(MemplanError, match="does not know model_type 'not_a_model'"):
        resolve_model(str(path))


# -------------------------------------------------------------------------------------------------- GPUs


@pytest.mark.parametrize("entry", GPUS, ids=[g["name"] for g in GPUS])
def test_every_gpu_resolves_with_a_positive_memory(entry):
    for ref in [entry["name"], entry["name"].upper(), *entry.get("aliases", [])]:
        gpu = resolve_gpu(ref)
        assert gpu.name == entry["name"]
    assert gpu.memory_bytes == entry["memory_mib"] * 2**20 > 0
    assert gpu.kind in ("consumer", "workstation", "datacenter")
    assert gpu.source


def test_gpu_catalog_is_consistent():
    names = [g["name"] for g in GPUS]
    assert len(names) == len(set(names)) >= 30
    aliases = [a.lower() for g in GPUS for a in [g["name"], *g.get("aliases", [])]]
    assert len(aliases) == len(set(aliases)), "an alias names two GPUs"
    listed = gpu_list()
    assert [g.name for g in listed] == sorted(names, key=lambda n: (resolve_gpu(n).memory_bytes, n))
    assert resolve_gpu("4090").memory_bytes == 24564 * 2**20
    assert resolve_gpu("h100").memory_bytes == 81559 * 2**20


def test_an_unknown_gpu_suggests_close_names():
    with pytest.raises(MemplanError, match="unknown GPU 'rtx-4091'; did you mean: rtx-4090"):
        resolve_gpu("rtx-4091")
    with pytest.raises(MemplanError, match="unknown GPU 'h100-sxm5'; did you mean: h100-sxm"):
        resolve_gpu("h100-sxm5")
