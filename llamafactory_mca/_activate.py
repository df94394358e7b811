"""Target of the `llamafactory_mca.pth` start-up line, run in every Python process.

It only reads two environment variables; when neither is set it returns at once and imports nothing else,
so a Python without `USE_MCA` behaves exactly as if this package were not installed.
"""

import os

if os.environ.get("USE_MCA", "").lower() in ("1", "true", "y", "yes", "on") or os.environ.get(
    "LLAMAFACTORY_MCA_ACTIVE"
) == "1":
    from llamafactory_mca.activation import activate

    activate()
