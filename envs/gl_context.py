"""Keep dm_control's EGL context bound when other EGL users share the process.

dm_control (``dm_control/_render/base.py``) remembers, per thread, which of its GL
contexts it made current and skips ``eglMakeCurrent`` when it believes its own context
is already bound. MuJoCo's ``mujoco.egl.GLContext`` (the renderer of gymnasium's
``MujocoRenderer``, hence of Meta-World) calls ``eglReleaseThread`` when it is created
and when it is freed, which unbinds whatever context the thread had without telling
dm_control. From then on every frame of a live dm_control environment is rendered into
no context: black frames with garbage rows, silently, for the rest of that
environment's life (measured: 99.99% of the pixels differ; ``tests/test_envs.py``).
That happens whenever a Meta-World renderer is created or garbage-collected while a
pixel DMC environment lives in the same process: a test run, a multi-task evaluation
script, a notebook.

Neither library offers a hook for this, so :func:`bind_dm_control_context` checks the
thread's current EGL context before dm_control renders and re-binds dm_control's own
context when it is not the bound one (one ``eglGetCurrentContext`` call, microseconds).
Only the EGL backend is affected; for other ``MUJOCO_GL`` backends it does nothing.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["bind_dm_control_context"]


def bind_dm_control_context(physics: Any) -> bool:
    """Make ``physics``'s dm_control EGL context current if another one displaced it.

    Returns True when it had to re-bind. A no-op (False) for backends other than EGL and
    before ``physics`` has created its rendering contexts.
    """
    if os.environ.get("MUJOCO_GL", "").lower() != "egl":
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
