"""SimWorld: layouts and renders of deterministic scenes by index."""
from __future__ import annotations

from .camera import Camera
from .render import Scene, render_layout
from .splits import check_split
from .world import Layout, SimWorldConfig, make_layout


class SimWorld:
    """Deterministic scenes: everything about scene ``index`` of ``split`` follows from
    (config.seed, split, index), whatever was generated before."""

    def __init__(self, config: SimWorldConfig | None = None, split: str = "train") -> None:
        self.config = (config or SimWorldConfig()).validate()
        self.split = check_split(split)

    def layout(self, index: int) -> Layout:
        return make_layout(self.config, self.split, index)

    def render(self, layout: Layout, camera: Camera | None = None) -> Scene:
        """camera None -> the layout's default camera at the configured resolution."""
        camera = camera or layout.default_camera(self.config.width, self.config.height)
        return render_layout(layout, camera)

    def scene(self, index: int) -> Scene:
        return self.render(self.layout(index))
