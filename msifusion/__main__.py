"""``python -m msifusion``: see :mod:`msifusion.cli`."""
from .cli import main

raise SystemExit(main())
