"""NBD frontend: obd stacks served by nbdkit's Python plugin (docs/nbd.md).

``plugin.py`` is the script nbdkit loads; ``backend.py`` holds the plugin's logic and is what tests
and other code import. Start a server with ``obd nbd IMAGE --socket PATH`` or, by hand,
``nbdkit python frontends/nbd/plugin.py image=IMAGE [upper=DIR]``.
"""

from pathlib import Path

#: The script to give nbdkit (``nbdkit python PLUGIN_PATH key=value …``).
PLUGIN_PATH = Path(__file__).resolve().parent / "plugin.py"
