"""Pixel DMC and Meta-World in one process: keep their EGL contexts apart.

dm_control (``dm_control/_render/base.py``) renders through its own EGL contexts;
Meta-World renders through gymnasium's ``OffScreenViewer``, a ``mujoco.egl.GLContext``
plus a ``mujoco.MjrContext`` (MuJoCo's GL objects: the offscreen framebuffer, textures).
Each library assumes it is alone, and two things go wrong when they share a process (a
test run, a multi-task evaluation script, a notebook), both silently: the DMC frames come
out black with garbage rows for the rest of that environment's life (99.99% of pixels
wrong; found by a flaky ``tests/test_envs.py::test_seeding``).

1. dm_control remembers which of its contexts it made current on a thread and skips
   ``eglMakeCurrent`` when it believes its own is bound. ``mujoco.egl.GLContext`` binds
   its context (each Meta-World render) and calls ``eglReleaseThread`` when created and
   freed, without telling dm_control, which then renders into another context or none.
   :func:`bind_dm_control_context` checks the bound context before a DMC pixel step and
   re-binds dm_control's own when another displaced it (one ``eglGetCurrentContext``).
2. gymnasium's ``OffScreenViewer.close()`` frees its GL context but keeps its
   ``MjrContext``; when the viewer is garbage-collected later, the ``MjrContext``
   destructor runs ``mjr_freeContext`` in whatever context is bound then, possibly
   dm_control's, and deletes *its* framebuffer (GL object names are small integers that
   both contexts use). :func:`release_mujoco_renderer` frees each viewer's
   ``MjrContext`` inside its own GL context first; our Meta-World adapter's ``close()``
   calls it, and so should code that closes its own gymnasium MuJoCo environments.

Neither library has a hook for this, hence this module. Only the EGL backend is
affected; for other ``MUJOCO_GL`` backends both functions do nothing.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["bind_dm_control_context", "release_mujoco_renderer"]


def _egl() -> bool:
    return os.environ.get("MUJOCO_GL", "").lower() == "egl"


def bind_dm_control_context(physics: Any) -> bool:
    """Make ``physics``'s dm_control EGL context current if another one displaced it.

    Returns True when it had to re-bind. A no-op (False) for backends other than EGL and
    before ``physics`` has created its rendering contexts.
    """
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
    """Free the ``MjrContext`` of each offscreen viewer of a gymnasium MuJoCo ``env``
    inside that viewer's own GL context, before ``env.close()`` frees the GL context.

    Returns the number of viewers released. Safe to call twice (a freed ``MjrContext``
    holds no GL objects) and on environments that never rendered.
    """
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
