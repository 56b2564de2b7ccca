"""``python -m fastlb.cli``: the same as the ``fastlb`` command (the tests run it so)."""

from fastlb.cli import main

main()
