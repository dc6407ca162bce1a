"""``python -m oceanda`` is the ``oceanda`` console script."""

from oceanda.cli import main

raise SystemExit(main())
