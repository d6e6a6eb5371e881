"""A griffe extension for the API reference: Sphinx roles in docstrings as Markdown code.

The docstrings cross-reference in reStructuredText (``:class:`~probe.model.Transformer```,
``:func:`generate```), which Markdown would print verbatim, colons and backticks included.
Each role becomes a code span of what Sphinx would display: the target, its last component when
it starts with ``~``, or the explicit title of ``:role:`title <target>```. Code spans, not links:
a link to an object the reference does not render would fail the strict build.
"""

from __future__ import annotations

import re

import griffe

# :class:`X`, :py:func:`X`, :meth:`~a.B.c`, :data:`title <a.B>` (Sphinx's role syntax).
ROLE = re.compile(r":(?:py:)?(?:class|func|meth|data|attr|mod|obj|exc|const):`([^`]+)`")


def _shown(target: str) -> str:
    """What Sphinx displays for a role's content."""
    titled = re.fullmatch(r"(.+?)\s*<([^>]+)>", target)
    if titled:
        return titled.group(1)
    if target.startswith("~"):
        return target[1:].rsplit(".", 1)[-1]
    return target


def rst_roles_to_markdown(text: str) -> str:
    """``text`` with every Sphinx role replaced by a Markdown code span."""
    return ROLE.sub(lambda m: f"`{_shown(m.group(1))}`", text)


class RstRoles(griffe.Extension):
    """Rewrites every loaded object's docstring once the tree is complete."""

    def on_object(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.is_alias or obj.docstring is None:
            return
        obj.docstring.value = rst_roles_to_markdown(obj.docstring.value)
