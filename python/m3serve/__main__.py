"""``python -m m3serve`` is the same as the ``m3serve`` console script."""

from m3serve.cli import main

raise SystemExit(main())
