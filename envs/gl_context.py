"""Pixel DMC and Meta-World in one process: keep their EGL contexts apart, else DMC frames
come out black (docs/implementation.md, "Pixel DMC and Meta-World in one process").
No-ops unless ``MUJOCO_GL=egl``."""

from __future__ import annotations

import os
from typing import Any

__all__ = ["bind_dm_control_context", "release_mujoco_renderer"]


def _egl() -> bool:
    return os.environ.get("MUJOCO_GL", "").lower() == "egl"


def bind_dm_control_context(physics: Any) -> bool:
    """Make ``physics``'s dm_control EGL context current if another displaced it; True if
    it had to re-bind."""
    if not _egl():
        return False
    contexts = getattr(physics, "_contexts", None)  # created lazily by the first render
    gl = getattr(contexts, "gl", None) if contexts is not None else None
    own = getattr(gl, "_context", None)
    if not own:
        return False
    from OpenGL import EGL

    current = EGL.eglGetCurrentContext()
    if current and current.address == own.address:
        return False
    # dm_control's bookkeeping already names this context as the thread's current one
    # (that is why it would skip the call): bind it for real on its render thread.
    with gl._render_executor.execution_context() as executor:
        executor.call(gl._platform_make_current)
    return True


def release_mujoco_renderer(env: Any) -> int:
    """Free each offscreen viewer's ``MjrContext`` of a gymnasium MuJoCo ``env`` in its own
    GL context, before ``env.close()``; returns the count released. Safe to call twice."""
    renderer = getattr(getattr(env, "unwrapped", env), "mujoco_renderer", None)
    viewers = getattr(renderer, "_viewers", None) or {}
    released = 0
    for viewer in viewers.values():
        context = getattr(viewer, "opengl_context", None)
        mjr_context = getattr(viewer, "con", None)
        if context is None or mjr_context is None or not getattr(context, "_context", True):
            continue  # no GL context any more: nothing can be freed safely
        viewer.make_context_current()
        mjr_context.free()
        released += 1
    return released
