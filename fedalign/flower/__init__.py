"""fedalign on Flower: the same recipe, algorithm objects, privacy mechanisms and local trainers as the
in-process runtime, with the clients on Flower nodes (:mod:`.apps`, :mod:`.server`, :mod:`.node`,
:mod:`.remote`, :mod:`.wire`).

Importing this package turns Flower's telemetry and update checks off unless the environment says
otherwise: a federation of organisations that keep their data private should not report home by default.
"""

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
