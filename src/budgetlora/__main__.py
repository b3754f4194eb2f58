"""``python -m budgetlora``: the same as the ``budgetlora`` command."""

import sys

from budgetlora.cli import main

sys.exit(main())
