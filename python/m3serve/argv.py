"""Reading SGLang command-line flags from an argv list (``--flag v`` and ``--flag=v``): the plugin
inspects ``sys.argv`` before SGLang parses it, the launcher inspects the args it passes."""

from __future__ import annotations

from collections.abc import Sequence


def argv_values(argv: Sequence[str], *flags: str) -> list[str]:
    """Every value given to any of ``flags``, in order."""
    out = []
    for i, a in enumerate(argv):
        for f in flags:
            if a == f and i + 1 < len(argv):
                out.append(argv[i + 1])
            elif a.startswith(f + "="):
                out.append(a.split("=", 1)[1])
    return out


def argv_has(argv: Sequence[str], flag: str) -> bool:
    """Whether ``flag`` appears at all (with or without a value)."""
    return any(a == flag or a.startswith(flag + "=") for a in argv)
