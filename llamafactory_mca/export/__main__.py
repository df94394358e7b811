"""`python -m llamafactory_mca.export merge|convert ...`."""

from llamafactory_mca.export.commands import main

raise SystemExit(main())
