"""The recovery bench's figure: one panel without a recovery curve, two with one."""
from __future__ import annotations

import io

from bench import recovery as bench


def _pt(part: str, mode: str, tokens: int, kld: float) -> bench.RPoint:
    return bench.RPoint(part, "3bpw", mode, 8, tokens, 1000, 3.0, kld, 50.0, 40.0, 0.5, 1.0)


def _width(png: bytes) -> int:
    from PIL import Image

    return Image.open(io.BytesIO(png)).size[0]


def test_the_curve_panel_is_drawn_only_with_a_curve() -> None:
    packed = [_pt("packed", "none", 0, 0.7), _pt("packed", "block+e2e", 100, 0.4)]
    curve = [_pt("curve", "none", 0, 0.7), _pt("curve", "block", 10, 0.6), _pt("curve", "block", 100, 0.5)]
    one, two = bench.plot_png(packed, [], "t"), bench.plot_png(packed + curve, [], "t")
    assert one[:8] == two[:8] == b"\x89PNG\r\n\x1a\n"
    assert _width(two) > 1.5 * _width(one)
