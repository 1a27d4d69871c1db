"""``python -m fedalign.embedded``: rebuild the embedded tiny model and data."""

from fedalign.embedded import main

main()
