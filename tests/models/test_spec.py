import pytest

from d2m_dist.config import ConfigError, MoEConfig, SiteOverride
from d2m_dist.models.spec import MoESpec, select_sites


def test_parse_and_resolve_flux_default():
    spec = MoESpec.parse("1S12E2A")
    shape = spec.resolve(3072, 12288)
    assert (shape.shared_width, shape.num_experts, shape.expert_width, shape.top_k) == (3072, 12, 768, 2)
    assert shape.activated_width / shape.hidden == 0.375
    assert str(spec) == "1S12E2A"


def test_fractional_shared_ratio():
    shape = MoESpec.parse("0.5S14E2A").resolve(3072, 12288)
    assert shape.shared_width == 1536 and shape.expert_width == 768


@pytest.mark.parametrize(
    "text, field",
    [
        ("12E2A", "expected"),  # malformed
        ("1S12E13A", "active experts"),  # k > n
        ("1S0E0A", "number of experts"),
        ("-1S12E2A", "expected"),  # negative ratio does not parse
    ],
)
def test_invalid_specs_name_the_field(text, field):
    with pytest.raises(ConfigError, match=field):
        MoESpec.parse(text)


def test_non_integer_widths_rejected():
    with pytest.raises(ConfigError, match="does not divide"):
        MoESpec.parse("1S7E2A").resolve(3072, 12288)
    with pytest.raises(ConfigError, match="not an integer"):
        MoESpec.parse("0.25S12E2A").resolve(10, 40)
    with pytest.raises(ConfigError, match="exceeds"):
        MoESpec.parse("5S12E2A").resolve(3072, 12288)


def test_site_selection_and_overrides():
    assert len(select_sites(MoEConfig(), 19, 38)) == 76
    assert all(s.startswith("double") for s in select_sites(MoEConfig(sites="double"), 2, 3))
    assert list(select_sites(MoEConfig(sites="single"), 2, 3)) == ["single.0.mlp", "single.1.mlp", "single.2.mlp"]
    specs = select_sites(MoEConfig(sites="list", double_blocks=[1], single_blocks=[0]), 2, 3)
    assert list(specs) == ["double.1.ff", "double.1.ff_context", "single.0.mlp"]
    cfg = MoEConfig(spec="1S12E2A", overrides=[SiteOverride(sites="double.[0-3].*", spec="1S6E1A")])
    specs = select_sites(cfg, 19, 38)
    assert str(specs["double.3.ff"]) == "1S6E1A" and str(specs["double.4.ff"]) == "1S12E2A"
    with pytest.raises(ConfigError, match="matches no"):
        select_sites(MoEConfig(overrides=[SiteOverride(sites="triple.*", spec="1S6E1A")]), 2, 2)
    with pytest.raises(ConfigError, match="out of range"):
        select_sites(MoEConfig(sites="list", double_blocks=[5]), 2, 2)
