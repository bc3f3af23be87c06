from __future__ import annotations

from types import SimpleNamespace

import pytest

from bitalloc.errors import InputError
from bitalloc.models.archs import ARCHS, ArchSpec, arch_for, supported_types


def test_table_covers_required_types():
    for t in ("llama", "mistral", "qwen2", "qwen3", "gemma3", "gemma3_text"):
        spec = arch_for(SimpleNamespace(model_type=t))
        assert spec.linears[0] == "self_attn.q_proj" and len(spec.linears) == 7
    assert arch_for(SimpleNamespace(model_type="gemma3_text")).group_norms[2] == "pre_feedforward_layernorm"
    assert arch_for(SimpleNamespace(model_type="gemma3")).blocks == "model.language_model.layers"
    assert arch_for(SimpleNamespace(model_type="llama")).norm_offset == 0.0


def test_unknown_type_lists_supported():
    with pytest.raises(InputError) as e:
        arch_for(SimpleNamespace(model_type="gpt2"))
    assert "'gpt2'" in str(e.value) and all(t in str(e.value) for t in supported_types())


def test_table_is_read_only():
    with pytest.raises(TypeError):
        ARCHS["x"] = ARCHS["llama"]  # type: ignore[index]


def test_spec_validation():
    base = ARCHS["llama"]
    kw = {f: getattr(base, f) for f in base.__dataclass_fields__}
    with pytest.raises(ValueError, match="group_norms"):
        ArchSpec(**{**kw, "group_norms": (None,)})
    with pytest.raises(ValueError, match="tie group"):
        ArchSpec(**{**kw, "tie_groups": (("self_attn.q_proj", "nope"),)})
    with pytest.raises(ValueError, match="two groups"):
        ArchSpec(**{**kw, "groups": kw["groups"] + (("self_attn.o_proj",),),
                    "group_norms": kw["group_norms"] + (None,)})


def test_real_tiny_models_resolve(tiny_model):
    assert arch_for(tiny_model.config).name == tiny_model.config.model_type
